"""Fetch the release the signed index names for an alias; install it once accepted.

refresh the release index (python-tuf) -> the alias's entry and its release record
(signed) -> download that record's MLflow version into a staging folder, only the files
and sizes the record names -> `accept` (signature, model, revocation, alias freshness,
base digest, local policy) -> swap into place (`clients.task.files.swap_directory`).
MLflow's own aliases are never read: MLflow only holds the files. Nothing unaccepted is
ever left at ``out``, and ``out`` is only replaced when it is empty or an earlier pull's
output (`check_out`): a pull never deletes files it did not write.

    release = pull(store, model="intents", alias="production", trust=trust,
                   out=Path("adapters/intents"), state=Path("~/.fedlora/edge"))
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from clients.task.errors import ConfigError, FedloraError
from clients.task.files import swap_directory
from registry.accept import AcceptedRelease, accept
from registry.artifact import RELEASE_FILES, SIGNATURE_FILE
from registry.errors import VerificationError
from registry.index import ReleaseRecord
from registry.index_consumer import IndexClient
from registry.keys import TrustStore
from registry.mlflow_store import MlflowStore, staging
from registry.policy import LocalPolicy


def aliased_release(index: IndexClient, *, model: str, alias: str) -> ReleaseRecord:
    """The signed record of the release ``model@alias`` must be.

    Raises:
        VerificationError: ``index`` when the index names no such alias (saying what the
            model's aliases are, or which models there are) or has no record of the
            release it names.
    """
    entry = index.alias(model, alias)
    if entry is None:
        raise VerificationError(
            "index", f"the release index has no {model}@{alias}{_instead(index, model)}"
        )
    record = index.release(model, entry.release)
    if record is None or record.digest != entry.digest:
        raise VerificationError(
            "index",
            f"the release index has no record of release {entry.release} "
            f"({entry.digest[:16]}) of {model!r}; publish it again with this fedlora",
        )
    return record


def _instead(index: IndexClient, model: str) -> str:
    """What the index has instead of a missing alias, for the error: the model's aliases
    or, for a model it does not know (a typo?), the models it has."""
    try:
        models = index.models()
    except FedloraError:  # only the message is at stake
        return ""
    if model in models:
        aliases = ", ".join(models[model]) or "none yet"
        return f" ({model!r} has aliases: {aliases})"
    names = ", ".join(repr(m) for m in models) or "none yet"
    return f": it has no model {model!r} (its models: {names})"


def check_out(out: Path) -> None:
    """Refuse ``out`` unless a pull may replace it: absent, an empty directory, or an
    earlier pull's output (plain release files only, ``model.sig`` among them).

    Raises:
        ConfigError: naming ``out`` and, for a directory, the first files a pull did not
            write, so nothing of the user's is removed.
    """
    if out.is_symlink():
        raise ConfigError(f"--out {str(out)!r} is a symbolic link; give the directory itself")
    # What an interrupted swap leaves beside --out (the old output put aside, a partial
    # copy) is put back or removed by the next swap: it must be a pull's too.
    for side in (out.parent / f".{out.name}.old", out.parent / f".{out.name}.incoming"):
        if os.path.lexists(side) and (side.is_symlink() or not side.is_dir() or _foreign(side)):
            raise ConfigError(
                f"{str(side)!r} beside --out {str(out)!r} is not what an interrupted pull "
                "leaves there "
                "(a pull would put it back or remove it); move it away first"
            )
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file, not a directory")
    entries = sorted(out.iterdir())
    if not entries:
        return
    if others := _foreign(out):
        raise ConfigError(
            f"--out {str(out)!r} holds files a pull did not write ({', '.join(others[:3])}"
            f"{', …' if len(others) > 3 else ''}); a pull only replaces an empty directory "
            "or an earlier pull's output"
        )
    if not (out / SIGNATURE_FILE).is_file():
        raise ConfigError(
            f"--out {str(out)!r} is not an earlier pull's output (no {SIGNATURE_FILE}); "
            "a pull only replaces an empty directory or an earlier pull's output"
        )


def _foreign(directory: Path) -> list[str]:
    """Names in ``directory`` that are not plain release files (what a pull writes)."""
    return [
        p.name
        for p in sorted(directory.iterdir())
        if p.name not in RELEASE_FILES or p.is_symlink() or not p.is_file()
    ]


def download(store: MlflowStore, record: ReleaseRecord, *, model: str, dst: Path) -> Path:
    """The files of a recorded release in a new folder ``dst``, checked against the record
    before download."""
    dst.mkdir()
    return store.download_release(model, record.version, dst, allowed=record.files)


def pull(
    store: MlflowStore,
    *,
    model: str,
    alias: str,
    trust: TrustStore,
    out: Path,
    state: Path,
    policy: LocalPolicy | None = None,
) -> AcceptedRelease:
    """Download the release the signed index names for ``model@alias``, accept, install.

    Raises:
        ConfigError: ``out`` is neither absent, empty nor an earlier pull's output
            (`check_out`); checked before the registry is asked anything.
        VerificationError: the release was refused (`accept`).
    """
    check_out(out)
    policy = policy or LocalPolicy()
    index = IndexClient(store.fetch_index_file, state / "tuf", trust)
    index.refresh()
    record = aliased_release(index, model=model, alias=alias)
    with staging("fedlora-pull-") as tmp:
        directory = download(store, record, model=model, dst=tmp / "release")
        accepted = accept(
            directory,
            trust=trust,
            model=model,
            index=index,
            alias=alias,
            base_digest=policy.base_digest,
            policy=policy,
        )
        check_out(out)  # again: the download may have taken minutes
        swap_directory(directory, out)
    # The installed files are the accepted ones, moved (or copied) into place.
    return replace(accepted, directory=out)
