"""A release as the runtime loads it: exactly its verified bytes, as one adapter on a shared base.

`read_release` reads every file of an accepted release once, checks those bytes against
the signed manifest digest that `registry.accept` returned (`registry.signing.files_digest`)
and parses the adapter config and tensors from the same bytes: nothing is opened twice,
so a file changed after verification is refused, never loaded.

`check_servable` admits only plain LoRA configs: anything that would change the shared
base model (a bias, PiSSA/LoftQ-style initialisations, layer replication) or that PEFT
cannot route per request (DoRA, parameter targets) is refused, because on a shared base
one release must never change what another answers. `check_routable` refuses, for the
same reason, ``modules_to_save`` of a kind PEFT cannot route per row (a norm layer).

An `AdapterSlot` is one adapter's room in the base model (PEFT's modules for one adapter
name) plus the map from each tensor name of a PEFT adapter file to the parameter it fills
(`peft.get_peft_model_state_dict`, the inverse of how PEFT saves). `bind` copies a
release's tensors into a slot and refuses a release whose file and slot do not hold
exactly the same tensors, names and shapes: PEFT itself loads with ``strict=False`` and
silently drops tensors whose modules the config no longer targets.

    files = read_release(accepted)             # VerificationError("signature") if changed
    config = check_servable(files.config, task="sequence-classification")
    bind(slot, files.tensors, release="3")     # VerificationError("unloadable") if unused
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import torch

from registry.accept import AcceptedRelease
from registry.artifact import ADAPTER_FILES, PROVENANCE_FILE, SIGNATURE_FILE, Provenance
from registry.errors import VerificationError
from registry.signing import files_digest

CONFIG_FILE, WEIGHTS_FILE = ADAPTER_FILES
PEFT_TASK_TYPES = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
# LoRA config fields a release may set freely; every other field must keep PEFT's default.
FREE_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "use_rslora", "modules_to_save", "init_lora_weights",
    "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern", "lora_bias",
})  # fmt: skip
# Initialisations that only set the adapter's own tensors (others rewrite base weights).
PLAIN_INITS = (True, False, "gaussian")
# The modules PEFT's mixed batch runs per row through each adapter's modules_to_save copy
# (peft.utils.other.AuxiliaryTrainingWrapper._mixed_batch_forward raises for any other).
MIXABLE = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
# Fields that change neither the adapter's modules nor its scaling (slot reuse ignores them).
IRRELEVANT_TO_SHAPE = ("auto_mapping", "peft_version", "base_model_name_or_path", "revision",
                       "inference_mode", "lora_dropout")  # fmt: skip


@dataclass(frozen=True)
class ReleaseFiles:
    """The parsed contents of a release's verified bytes."""

    config: dict[str, Any]  # adapter_config.json
    tensors: dict[str, torch.Tensor]  # adapter_model.safetensors, on the CPU
    nbytes: int  # size of the adapter weights file


def _unloadable(release: str, detail: str) -> VerificationError:
    return VerificationError("unloadable", f"release {release}: {detail}")


def read_release(accepted: AcceptedRelease) -> ReleaseFiles:
    """Read every file of ``accepted`` once; parse the adapter from the bytes it verified.

    Raises:
        VerificationError: ``signature`` when the bytes are not those `accept` verified,
            ``unloadable`` when they are but do not hold a safetensors LoRA adapter.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    root = accepted.directory
    release = str(accepted.provenance.release)
    files: dict[str, bytes] = {}
    try:
        for path in sorted(root.rglob("*")):
            name = path.relative_to(root).as_posix()
            if path.is_symlink():  # model-signing refuses links when it verifies, so do we
                raise VerificationError("signature", f"{root}: {name} is a symbolic link")
            if path.is_file() and name != SIGNATURE_FILE:
                files[name] = path.read_bytes()
    except OSError as exc:
        raise VerificationError("signature", f"{root}: cannot read the release: {exc}") from exc
    if files_digest(files) != accepted.digest:
        raise VerificationError(
            "signature",
            f"{root}: the files differ from those verified (manifest digest "
            f"{files_digest(files)[:16]}, verified {accepted.digest[:16]})",
        )
    try:
        provenance = Provenance.from_dict(json.loads(files[PROVENANCE_FILE]))
        config = json.loads(files[CONFIG_FILE])
    except (KeyError, ValueError, TypeError) as exc:
        raise _unloadable(release, f"{exc!r} in {PROVENANCE_FILE}/{CONFIG_FILE}") from exc
    if provenance != accepted.provenance:
        raise VerificationError("signature", f"{root}: {PROVENANCE_FILE} differs from the verified")
    if WEIGHTS_FILE not in files:
        raise _unloadable(release, f"no {WEIGHTS_FILE} (only safetensors adapters are served)")
    try:
        tensors = load_safetensors(files[WEIGHTS_FILE])
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise _unloadable(release, f"{WEIGHTS_FILE}: {exc}") from exc
    if not isinstance(config, dict):
        raise _unloadable(release, f"{CONFIG_FILE} is not a JSON object")
    return ReleaseFiles(config, tensors, len(files[WEIGHTS_FILE]))


def check_servable(config: dict[str, Any], *, task: str, release: str) -> Any:
    """The `peft.LoraConfig` of ``config``, if a shared base can serve it; else refuse.

    Raises:
        VerificationError: ``unloadable``, naming the field and its value.
    """
    from peft import LoraConfig

    if config.get("peft_type") != "LORA":
        raise _unloadable(release, f"{CONFIG_FILE}: peft_type={config.get('peft_type')!r}; "
                          "only LoRA adapters are served")  # fmt: skip
    if config.get("task_type") != PEFT_TASK_TYPES[task]:
        raise _unloadable(release, f"{CONFIG_FILE}: task_type={config.get('task_type')!r} does "
                          f"not match the release's task {task!r}")  # fmt: skip
    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise _unloadable(release, f"{CONFIG_FILE}: unknown field {unknown[0]!r} (peft "
                          "would drop it silently)")  # fmt: skip
    defaults = LoraConfig().to_dict()
    for name in sorted(set(config) - FREE_FIELDS):
        if name in defaults and _plain(config[name]) != _plain(defaults[name]):
            raise _unloadable(release, f"{CONFIG_FILE}: {name}={config[name]!r} is not servable "
                              "on a shared base (only plain LoRA is)")  # fmt: skip
    if config.get("init_lora_weights", True) not in PLAIN_INITS:
        raise _unloadable(release, f"{CONFIG_FILE}: init_lora_weights="
                          f"{config['init_lora_weights']!r} rewrites base weights")  # fmt: skip
    try:
        lora = LoraConfig(**(config | {"inference_mode": True}))
    except (TypeError, ValueError) as exc:
        raise _unloadable(release, f"{CONFIG_FILE}: {exc}") from exc
    return lora


def check_routable(model: torch.nn.Module, config: Any, *, release: str) -> None:
    """Refuse ``modules_to_save`` that PEFT cannot route per row of a mixed batch.

    PEFT keeps a copy of each such module per adapter and runs each row of a mixed batch
    through its adapter's copy, which it can do for Linear, Embedding and Conv modules
    only. Another kind (a norm layer, say) would make every mixed batch on the shared
    base fail, whatever releases its rows ask for. Modules match as PEFT matches them:
    by the end of their name.

    Raises:
        VerificationError: ``unloadable``, naming the module and its type.
    """
    from peft.utils import AuxiliaryTrainingWrapper

    wanted = list(config.modules_to_save or [])
    for key, module in model.named_modules(remove_duplicate=False):
        if not any(key.endswith(name) for name in wanted):
            continue
        if isinstance(module, AuxiliaryTrainingWrapper):  # wrapped for an earlier release
            module = module.original_module
        if not isinstance(module, MIXABLE):
            raise _unloadable(
                release,
                f"{CONFIG_FILE}: modules_to_save={wanted!r} takes {key} "
                f"({type(module).__name__}), which PEFT cannot route per request: every "
                "mixed batch on the shared base would fail",
            )


def _plain(value: Any) -> Any:
    """JSON-comparable form of a config value (sets become sorted lists)."""
    if isinstance(value, set | frozenset):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def shape_key(config: Any) -> str:
    """Two configs with the same key make identical adapter modules and scaling."""
    fields = {k: v for k, v in config.to_dict().items() if k not in IRRELEVANT_TO_SHAPE}
    return json.dumps(_plain(fields), sort_keys=True, default=str)


@dataclass(eq=False)
class AdapterSlot:
    """One adapter name in a shared PEFT model and the parameters a release file fills."""

    name: str
    shape: str  # `shape_key` of the config it was made with
    params: dict[str, torch.Tensor] = field(repr=False)  # file tensor name -> parameter
    nbytes: int = 0

    @classmethod
    def of(cls, model: Any, name: str, shape: str) -> AdapterSlot:
        """The slot of adapter ``name`` already added to ``model`` (a `peft.PeftModel`)."""
        from peft import get_peft_model_state_dict

        # The state dict's tensors share storage with the parameters they name.
        params = get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
        nbytes = sum(t.numel() * t.element_size() for t in params.values())
        return cls(name, shape, params, nbytes)


def bind(slot: AdapterSlot, tensors: dict[str, torch.Tensor], *, release: str) -> None:
    """Copy a release's tensors into ``slot``: exactly its tensors, each finite, or refuse.

    The slot must not be in use by any request (a fresh or retired one).

    Raises:
        VerificationError: ``unloadable``, naming a tensor the model would not use, a
            parameter the file does not fill, a shape mismatch or a non-finite value.
    """
    unused = sorted(set(tensors) - set(slot.params))
    missing = sorted(set(slot.params) - set(tensors))
    if unused or missing:
        raise _unloadable(
            release,
            f"{WEIGHTS_FILE} and {CONFIG_FILE} disagree: {len(unused)} tensors the model "
            f"would not use (e.g. {unused[:2]}), {len(missing)} parameters the file does not "
            f"fill (e.g. {missing[:2]}); check target_modules and modules_to_save",
        )
    for name, value in tensors.items():
        param = slot.params[name]
        if tuple(value.shape) != tuple(param.shape):
            raise _unloadable(release, f"tensor {name!r} has shape {tuple(value.shape)}, the "
                              f"model expects {tuple(param.shape)}")  # fmt: skip
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise _unloadable(release, f"tensor {name!r} holds NaN or infinite values")
    with torch.no_grad():
        for name, value in tensors.items():
            slot.params[name].copy_(value)
