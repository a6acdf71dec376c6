"""The release artifact: a standard PEFT directory plus ``provenance.json``.

A release directory holds the files of the trained adapter (``adapter_config.json``,
``adapter_model.safetensors``, fedlora's ``fedlora_task.json`` with the task and label
order, peft's model card ``README.md``), a ``provenance.json`` that says what the adapter
is and how it was made, and, once signed, ``model.sig``: `RELEASE_FILES`, nothing else.
`PeftModel.from_pretrained(base, DIR)` loads it with stock peft; a release whose
provenance says ``pooling: mean`` needs ``clients.task.pooling.apply_pooling(base, "mean")``
on the base first (the head reads the mean of the token states, not BERT's pooler).

Everything signed is copied from a folder by `copy_release_files`, which takes only those
names and refuses a symbolic link, a folder or any other file by name: a link in the
folder given to ``registry publish`` must not get, say, the publisher's private key
signed and uploaded.

    release = build_release(Path("fedlora-out"), Path("release"), release_number=3)
    provenance = read_provenance(Path("release"))
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
import shutil
import stat
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from clients.task.choices import (
    LEGACY_POOLING,
    MEAN_POOLING_FENCE,
    RESOLVED_POOLINGS,
    TASK_FILE,
)
from clients.task.errors import ConfigError
from clients.task.numbers import finite_number
from clients.task.text import short
from registry.errors import RegistryError

PROVENANCE_FILE = "provenance.json"
SIGNATURE_FILE = "model.sig"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_CARD = "README.md"  # peft's save_pretrained writes it
# Every file a signed release may hold; the edge downloads nothing else.
RELEASE_FILES = (*ADAPTER_FILES, TASK_FILE, MODEL_CARD, PROVENANCE_FILE, SIGNATURE_FILE)
# Files a training output's adapter may hold besides, never copied into a release: the
# fence that keeps publishers from before ``head.pooling`` off a mean-pooled adapter.
ADAPTER_ONLY_FILES = (MEAN_POOLING_FENCE,)
PROVENANCE_SCHEMA = "fedlora.provenance/v1"
# v2 adds ``pooling`` and is written only for a release whose head reads the mean of the
# token states: a reader from before the field refuses it by name instead of serving it
# with BERT's pooler (wrong answers, no error). Releases with the model's pooling stay v1.
PROVENANCE_SCHEMA_V2 = "fedlora.provenance/v2"
PROVENANCE_SCHEMAS = (PROVENANCE_SCHEMA, PROVENANCE_SCHEMA_V2)
# The privacy guarantees whose mechanism the server ran, and so can vouch for: clipping
# and noise of client-level DP. Sample-level DP (DP-SGD) runs at the sites: its ε is the
# server's account of its plan, which no gate may take as proof of privacy.
SERVER_GUARANTEES = ("client-level",)


@dataclass(frozen=True)
class Provenance:
    """What an adapter is and how it was made; written once, then covered by the signature."""

    model_name: str
    release: int
    created_at: str
    fedlora_version: str
    base_model: str
    base_digest: str
    task: str
    labels: list[str]
    lora: dict[str, Any]
    adapter_digest: str
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    privacy: dict[str, Any] = field(default_factory=dict)
    # What the classifier head reads (clients/task/pooling.py): "model" or "mean". Releases
    # from before the field have none and were trained with the model's own pooling.
    pooling: str = LEGACY_POOLING
    schema: str = PROVENANCE_SCHEMA

    def __post_init__(self) -> None:
        check_pooling(self.pooling, schema=self.schema, task=self.task)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        schema = data.get("schema")
        if schema not in PROVENANCE_SCHEMAS:
            raise RegistryError(
                f"{PROVENANCE_FILE}: schema={short(schema)}, expected one of "
                f"{', '.join(PROVENANCE_SCHEMAS)}"
            )
        known = set(cls.__dataclass_fields__)
        missing = sorted(k for k in known - {"pooling"} if k not in data)
        if missing:
            raise RegistryError(f"{PROVENANCE_FILE}: missing field {missing[0]!r}")
        if schema == PROVENANCE_SCHEMA_V2 and "pooling" not in data:
            raise RegistryError(f"{PROVENANCE_FILE}: schema {schema!r} needs a pooling field")
        try:
            return cls(**{k: data[k] for k in known if k in data})
        except RegistryError as exc:
            raise RegistryError(f"{PROVENANCE_FILE}: {exc}") from None

    def epsilon(self) -> float | None:
        """The largest ε over all guarantees, or None when no DP was used.

        Site-reported guarantees count here: a larger ε only makes a limit stricter.
        NaN if a guarantee's ε is missing or not a finite number ≥ 0, so every limit
        fails closed.
        """
        values: list[float] = []
        for name, guarantee in self.privacy.items():
            if name == "sample-level":
                sites = guarantee.get("sites") if isinstance(guarantee, dict) else None
                if not isinstance(sites, dict) or not sites:
                    values.append(math.nan)
                else:
                    values += [_epsilon(entry) for entry in sites.values()]
            elif name in SERVER_GUARANTEES or (
                isinstance(guarantee, dict) and "epsilon" in guarantee
            ):
                values.append(_epsilon(guarantee))
        return _largest(values)

    def verified_epsilon(self) -> float | None:
        """ε of the guarantees the server's own mechanism gives (`SERVER_GUARANTEES`),
        or None when there are none; NaN if one is malformed."""
        return _largest([_epsilon(g) for n, g in self.privacy.items() if n in SERVER_GUARANTEES])

    def headline_metric(self) -> tuple[str, float] | None:
        """(name, value) of the first metric present of accuracy, central_accuracy and
        federated_accuracy; the value is NaN unless it is a finite number."""
        for name in ("accuracy", "central_accuracy", "federated_accuracy"):
            if self.metrics.get(name) is not None:
                value = finite_number(self.metrics[name])
                return name, math.nan if value is None else value
        return None


def _epsilon(entry: object) -> float:
    """A guarantee's ε, NaN unless it states one that is a finite number ≥ 0."""
    value = finite_number(entry.get("epsilon") if isinstance(entry, dict) else None)
    return value if value is not None and value >= 0 else math.nan


def _largest(values: list[float]) -> float | None:
    """The largest value, NaN if any is NaN (max() would depend on the order), None if none."""
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values) if values else None


def fedlora_version() -> str:
    try:
        return version("fedlora")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def adapter_digest(directory: Path) -> str:
    """SHA-256 over the adapter's config and weights (names and contents)."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        with (directory / name).open("rb") as fh:
            file_hash = hashlib.file_digest(fh, "sha256").digest()
        h.update(name.encode() + b"\0")
        h.update(file_hash)
    return h.hexdigest()


def release_files(directory: Path, *, also: tuple[str, ...] = ()) -> list[str]:
    """The names in ``directory``, refused unless each is a plain release file (no link).

    ``also`` names further files the folder may hold (an adapter's `MEAN_POOLING_FENCE`).

    Raises:
        RegistryError: naming the first link, folder or file that is not in `RELEASE_FILES`
            or ``also``.
    """
    names = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        path = Path(directory) / entry.name
        if entry.is_symlink():
            raise RegistryError(f"{path} is a symbolic link; a release takes only plain files")
        if not entry.is_file(follow_symlinks=False):
            raise RegistryError(f"{path} is not a plain file; a release takes only plain files")
        if entry.name not in RELEASE_FILES and entry.name not in also:
            raise RegistryError(
                f"{path} is not a file of an adapter release (allowed: {', '.join(RELEASE_FILES)})"
            )
        names.append(entry.name)
    return names


def copy_release_files(
    src: Path, dst: Path, *, skip: tuple[str, ...] = (), also: tuple[str, ...] = ()
) -> None:
    """Copy the release files of ``src`` into a new folder ``dst``, never through a link.

    Each file is opened with ``O_NOFOLLOW`` and checked to be a regular file, so a link
    swapped in after the listing is refused too. Names in ``skip`` are not copied; ``src``
    may also hold the names in ``also`` (`release_files`), which are not copied either.
    """
    names = [n for n in release_files(src, also=also) if n not in skip and n not in also]
    dst.mkdir()
    for name in names:
        try:
            fd = os.open(src / name, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise RegistryError(f"cannot read {src / name}: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise RegistryError(f"{src / name} is not a plain file")
            with (dst / name).open("wb") as out:
                shutil.copyfileobj(fh, out)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if path.is_symlink():
        raise RegistryError(f"{what}: {path} is a symbolic link; only plain files are read")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{what}: {path} does not exist") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, not UTF-8, an int of
        # over 4,300 digits, nesting deeper than the parser's recursion limit
        raise RegistryError(f"{what}: {path} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise RegistryError(f"{what}: {path} holds {type(data).__name__}, expected an object")
    return data


def read_task(adapter: Path) -> dict[str, Any]:
    """An adapter's task file (`TASK_FILE`: task, labels, base, pooling) as a dict.

    Raises:
        RegistryError: naming the file when it is missing, a link, or not a JSON object.
    """
    return _read_json(adapter / TASK_FILE, "adapter task file")


def adapter_dir(source: Path) -> Path:
    """The PEFT directory inside a training output (``OUT/adapter``) or ``source`` itself.

    Raises:
        RegistryError: ``source`` missing or not a directory, a missing adapter file, or a
            link or a file that is not part of a release (`release_files`) nor
            `ADAPTER_ONLY_FILES`, or a `MEAN_POOLING_FENCE` over a task file that does not
            say ``pooling: mean``.
    """
    if not source.is_dir():
        why = "does not exist" if not source.exists() else "is not a directory"
        raise RegistryError(f"{source} {why}; expected a training output or PEFT directory")
    inner = source / "adapter"
    if inner.is_symlink():
        raise RegistryError(f"{inner} is a symbolic link; a release takes only plain files")
    candidate = inner if inner.is_dir() else source
    for name in ADAPTER_FILES:
        if not (candidate / name).is_file():
            raise RegistryError(f"{source} is not a training output or PEFT directory: no {name}")
    release_files(candidate, also=ADAPTER_ONLY_FILES)
    if (candidate / MEAN_POOLING_FENCE).exists():
        # checked here, so a re-publish of an already recorded adapter checks it too; an
        # adapter trained before the fence may lack it, which a current publisher serves
        # right (v2 provenance)
        said = _read_json(candidate / TASK_FILE, "adapter task file").get("pooling")
        if said != "mean":
            raise RegistryError(
                f"{candidate / MEAN_POOLING_FENCE} marks a mean-pooled head, but {TASK_FILE} "
                f"says pooling={short(said)}; refusing to guess which one the adapter was "
                "trained with"
            )
    return candidate


def _training_summary(source: Path) -> tuple[dict[str, Any], dict[str, float], dict[str, Any]]:
    """(training, final metrics, privacy) from ``OUT/metrics.json`` if there is one."""
    path = source / "metrics.json"
    if not path.is_file():
        return {}, {}, {}
    summary = _read_json(path, "metrics.json")
    rounds = [r for r in _shaped(summary, "rounds", list) if isinstance(r, dict)]
    for i, row in enumerate(rounds):
        ids = _shaped(row, "site_ids", list, where=f"rounds[{i}].")
        if not all(isinstance(s, str) for s in ids):
            raise RegistryError(f"metrics.json: 'rounds[{i}].site_ids' is list, expected names")
    sites = sorted({s for r in rounds for s in r.get("site_ids") or []})
    final = _shaped(summary, "final", dict)
    run_id = summary.get("mlflow_run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise RegistryError(
            f"metrics.json: 'mlflow_run_id' is {type(run_id).__name__}, expected a string"
        )
    # A number that is not finite (or past float range) is kept as NaN: present, so the
    # headline metric does not fall through to the next name, and failing every gate.
    metrics = {
        k: math.nan if (number := finite_number(v)) is None else number
        for k, v in final.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and k != "round"
    }
    training = {
        "mlflow_run_id": run_id,
        "rounds": len([r for r in rounds if not r.get("skipped")]),
        "sites": len(sites),
    }
    privacy = dict(_shaped(summary, "privacy", dict))
    check_privacy_record(privacy, rounds)
    return training, metrics, privacy


def _shaped(data: dict[str, Any], key: str, kind: type, *, where: str = "") -> Any:
    """``data[key]`` if it is a ``kind`` (list or dict), an empty one when absent or null.

    Raises:
        RegistryError: naming the field of metrics.json and what it holds instead.
    """
    value = data.get(key)
    if value is None:
        return kind()
    if not isinstance(value, kind):
        expected = "a list" if kind is list else "an object"
        raise RegistryError(
            f"metrics.json: '{where}{key}' is {type(value).__name__}, expected {expected}"
        )
    return value


def check_privacy_record(privacy: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    """Refuse a privacy summary that is not what the per-round record adds up to.

    The summary is what provenance (and so every gate) reads; the rounds are what the
    server accounted as it went. Each client-level round's (noise multiplier, sampling
    rate) and each site's per-round DP-SGD steps are replayed through `site_epsilon`,
    the RDP accounting sites and server share (it refuses the non-finite steps Opacus
    never returns on), and must give the summary's ε.

    Raises:
        RegistryError: Naming the guarantee and both numbers.
    """
    # torch/opacus: the publisher only; edge nodes never call this.
    from clients.task.dpsgd import site_epsilon

    def same(a: object, b: float) -> bool:
        return isinstance(a, int | float) and math.isclose(float(a), b, rel_tol=1e-9, abs_tol=1e-12)

    try:
        accounted = [r for r in rounds if r.get("guarantee") == "client-level"]
        client = privacy.get("client-level")
        if (client is None) != (not accounted):
            raise RegistryError(
                "metrics.json: the privacy summary and the rounds disagree on client-level DP "
                f"(summary: {'yes' if client else 'no'}, accounted rounds: {len(accounted)})"
            )
        if client is not None:
            released = [r for r in accounted if r.get("sampling_rate") is not None]
            steps = [(float(r["noise_multiplier"]), float(r["sampling_rate"]), 1) for r in released]
            epsilon = site_epsilon(steps, delta=float(client["delta"]))
            if not (same(client["epsilon"], epsilon) and same(accounted[-1]["epsilon"], epsilon)):
                raise RegistryError(
                    f"metrics.json: client-level ε={client['epsilon']!r} in the summary, "
                    f"{accounted[-1]['epsilon']!r} in the last round, but its "
                    f"{len(released)} released round(s) add up to {epsilon!r}"
                )
        sample = privacy.get("sample-level")
        per_site: dict[str, list[dict[str, Any]]] = {}
        for row in rounds:
            for site, entry in (row.get("site_privacy") or {}).items():
                per_site.setdefault(site, []).append(entry)
        claimed = (sample or {}).get("sites", {})
        if set(claimed) != set(per_site):
            raise RegistryError(
                f"metrics.json: sample-level sites {sorted(claimed)} in the summary, "
                f"{sorted(per_site)} in the rounds"
            )
        for site, entries in per_site.items():
            steps = [
                (float(e["noise-multiplier"]), float(e["sampling-rate"]), int(e["steps"]))
                for e in entries
            ]
            epsilon = site_epsilon(steps, delta=float(entries[-1]["delta"]))
            if not same(claimed[site]["epsilon"], epsilon):
                raise RegistryError(
                    f"metrics.json: sample-level ε={claimed[site]['epsilon']!r} of site "
                    f"{site!r}, but its {len(entries)} round(s) add up to {epsilon!r}"
                )
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError, ConfigError) as exc:
        # OverflowError: an integer past float range, which JSON reads exactly;
        # ConfigError: steps the accountant refuses or cannot account
        raise RegistryError(f"metrics.json: unreadable privacy record ({exc!r})") from exc


def check_pooling(pooling: object, *, schema: object, task: object) -> None:
    """Refuse a ``pooling`` a release cannot be served with.

    Raises:
        RegistryError: If it is not ``model`` or ``mean``, ``mean`` on a task without a
            classifier head, or ``mean`` in a v1 provenance (which an older reader would
            serve with the model's pooling).
    """
    if pooling not in RESOLVED_POOLINGS:
        raise RegistryError(
            f"pooling={short(pooling)}, expected one of {', '.join(RESOLVED_POOLINGS)}"
        )
    if pooling != LEGACY_POOLING and task != "sequence-classification":
        raise RegistryError(
            f"pooling={pooling!r} needs task 'sequence-classification', not {short(task)}"
        )
    if pooling != LEGACY_POOLING and schema != PROVENANCE_SCHEMA_V2:
        raise RegistryError(f"pooling={pooling!r} needs schema {PROVENANCE_SCHEMA_V2!r}")


def build_release(
    source: Path,
    out: Path,
    *,
    model_name: str,
    release: int,
    now: dt.datetime | None = None,
) -> Provenance:
    """Copy the adapter of ``source`` into ``out`` and write its provenance.

    ``source`` is a training output (``adapter/`` + ``metrics.json``) or a bare PEFT
    directory. ``out`` must not exist; the caller signs it afterwards.
    """
    adapter = adapter_dir(source)
    task = read_task(adapter)
    lora = _read_json(adapter / "adapter_config.json", "adapter config")
    training, metrics, privacy = _training_summary(source)
    pooling = task.get("pooling", LEGACY_POOLING)
    try:
        check_pooling(pooling, schema=PROVENANCE_SCHEMA_V2, task=task.get("task"))
    except RegistryError as exc:
        raise RegistryError(f"{adapter / TASK_FILE}: {exc}") from None
    if out.exists():
        raise RegistryError(f"{out} already exists")
    copy_release_files(
        adapter, out, skip=(PROVENANCE_FILE, SIGNATURE_FILE), also=ADAPTER_ONLY_FILES
    )
    provenance = Provenance(
        model_name=model_name,
        release=release,
        created_at=(now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
        fedlora_version=fedlora_version(),
        base_model=str(task.get("base_model", "")),
        base_digest=str(task.get("base_digest", "")),
        task=str(task.get("task", "")),
        labels=list(task.get("labels", [])),
        lora={
            k: lora.get(k)
            for k in ("peft_type", "r", "lora_alpha", "lora_dropout", "target_modules")
        }
        | {"modules_to_save": lora.get("modules_to_save")},
        adapter_digest=adapter_digest(out),
        training=training,
        metrics=metrics,
        privacy=privacy,
        pooling=pooling,
        schema=PROVENANCE_SCHEMA_V2 if pooling != LEGACY_POOLING else PROVENANCE_SCHEMA,
    )
    (out / PROVENANCE_FILE).write_text(provenance.to_json(), encoding="utf-8")
    return provenance


def read_provenance(directory: Path) -> Provenance:
    return Provenance.from_dict(_read_json(directory / PROVENANCE_FILE, "provenance"))
