"""``fedlora keys`` and ``fedlora registry``: key pairs and the signed MLflow registry.

`server.cli` finds `keys_group` and `registry_group` through the ``fedlora.commands``
entry points. The registry is ``--registry URI`` or ``MLFLOW_TRACKING_URI``; MLflow's
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` carry credentials. A key's
passphrase is read from the environment variable named by ``--passphrase-env``
(``FEDLORA_KEY_PASSPHRASE`` by default), never from the command line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.text import Text

from clients.task.interrupt import terminate_as_interrupt
from registry.errors import RegistryError
from registry.keys import (
    PASSPHRASE_ENV,
    TrustStore,
    generate_keypair,
    key_id,
    load_public_key,
)
from registry.lifecycle import (
    CANDIDATE,
    DEFAULT_STATE,
    PRODUCTION,
    SigningKey,
    add_signer,
    check_publish,
    promote,
    publish,
    renew,
    revoke,
    rollback,
)
from registry.mlflow_store import TAG, MlflowStore, default_uri
from registry.policy import Policy

out = Console(soft_wrap=True)


def say(line: str) -> None:
    """Print one line as it is: names from the registry are text, never rich markup, and a
    line is never cut to the terminal's width."""
    out.print(Text(line), soft_wrap=True)


def _passphrase(args: argparse.Namespace) -> str | None:
    value = os.environ.get(args.passphrase_env)
    if args.passphrase_env != PASSPHRASE_ENV and value is None:
        raise RegistryError(f"--passphrase-env {args.passphrase_env}: that variable is not set")
    return value or None


def _key_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument(
        "--key", required=required, metavar="PEM", help="private signing key (EC P-256 PEM)"
    )
    parser.add_argument(
        "--passphrase-env",
        default=PASSPHRASE_ENV,
        metavar="VAR",
        help=f"environment variable holding the key's passphrase (default {PASSPHRASE_ENV})",
    )
    parser.add_argument(
        "--state",
        metavar="DIR",
        help="where this publisher keeps the last release index it saw, to refuse an older "
        f"one (default: a folder per registry and key under {DEFAULT_STATE})",
    )


def _registry_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--registry", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)"
    )


def _index_trust_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust",
        metavar="DIR",
        help="trust store whose keys may vouch for an index root this publisher has not seen "
        "(needed once by a key added with add-signer; default: none)",
    )


def _trust(args: argparse.Namespace) -> TrustStore | None:
    return TrustStore.load(Path(args.trust)) if args.trust else None


def _store(args: argparse.Namespace, *, create: bool = False) -> MlflowStore:
    """The registry; only ``publish`` (``create``) may start one in a new SQLite file."""
    return MlflowStore(args.registry or default_uri(), create=create)


def _signing_key(args: argparse.Namespace) -> SigningKey:
    state = Path(args.state).expanduser() if getattr(args, "state", None) else None
    return SigningKey(Path(args.key), _passphrase(args), state)


def keys_group(sub: argparse._SubParsersAction) -> None:
    keys = sub.add_parser("keys", help="signing keys")
    commands = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    gen = commands.add_parser(
        "generate",
        help="create an EC P-256 signing key pair",
        description="Write DIR/signing-key.pem (mode 0600, encrypted when the passphrase "
        "variable is set) and DIR/signing-key.pub. Copy the .pub into every trust store.",
    )
    gen.add_argument("--out", required=True, metavar="DIR", help="directory for the key pair")
    gen.add_argument(
        "--passphrase-env",
        default=PASSPHRASE_ENV,
        metavar="VAR",
        help=f"encrypt with the passphrase in this variable (default {PASSPHRASE_ENV})",
    )
    gen.set_defaults(func=cmd_keys_generate)
    ident = commands.add_parser("id", help="print the key id (SHA-256 of the DER public key)")
    ident.add_argument("public_key", metavar="PUB", help="a public key (PEM)")
    ident.set_defaults(func=cmd_keys_id)


def _unwinds_on_sigterm(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Run a command that writes the registry with SIGTERM unwinding as Ctrl-C does, so
    `kill PID` (a CI job's timeout, a service manager) runs the same cleanup: a publish
    cut short removes its version, a promote puts the alias back (`registry.lifecycle`)."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        with terminate_as_interrupt():
            return command(args)

    return run


def cmd_keys_generate(args: argparse.Namespace) -> int:
    passphrase = _passphrase(args)
    pair = generate_keypair(Path(args.out), passphrase=passphrase)
    var = args.passphrase_env
    how = f"encrypted: ${var}" if passphrase else f"NOT encrypted: ${var} is not set"
    say(f"private key  {pair.private_path} (mode 0600, {how})")
    say(f"public key   {pair.public_path}")
    say(f"key id       {pair.key_id}")
    return 0


def cmd_keys_id(args: argparse.Namespace) -> int:
    say(key_id(load_public_key(Path(args.public_key))))
    return 0


def registry_group(sub: argparse._SubParsersAction) -> None:
    reg = sub.add_parser("registry", help="signed, versioned adapters in MLflow")
    commands = reg.add_subparsers(dest="registry_command", required=True, metavar="COMMAND")

    pub = commands.add_parser(
        "publish",
        help="sign and publish a trained adapter as a new model version",
        description="DIR is a training output (adapter/ + metrics.json), a PEFT directory, "
        "or a release already signed by a trusted key. Signs, uploads, creates the model "
        "version and moves the alias (default: candidate); publishing the same adapter "
        "again returns the existing version.",
    )
    pub.add_argument("source", metavar="DIR", help="training output, PEFT or release directory")
    pub.add_argument("--model", required=True, metavar="NAME", help="registered model name")
    pub.add_argument(
        "--alias", default=CANDIDATE, help="alias the new version gets (default: %(default)s)"
    )
    pub.add_argument(
        "--trust",
        metavar="DIR",
        help="trust store: to accept a signed DIR, and whose keys may vouch for an index root "
        "this publisher has not seen (default: none)",
    )
    _key_args(pub)
    _registry_arg(pub)
    pub.set_defaults(func=cmd_publish)

    ls = commands.add_parser("list", help="registered models and their aliases")
    _registry_arg(ls)
    ls.set_defaults(func=cmd_list)

    show = commands.add_parser(
        "show",
        help="versions of a model with their tags (unsigned, for people; publish, promote and "
        "revoke decide from the signed index)",
    )
    show.add_argument("model", metavar="NAME", help="registered model name")
    show.add_argument("--json", action="store_true", help="print JSON (default: text)")
    _registry_arg(show)
    show.set_defaults(func=cmd_show)

    pro = commands.add_parser(
        "promote",
        help="move an alias to a version if every policy gate passes",
        description="Verifies the version's signature against --trust, checks revocation "
        "and the gates of --policy (min-metric, max-epsilon, require-dp), then moves the "
        "alias in MLflow and in the signed release index.",
    )
    pro.add_argument("model", metavar="NAME", help="registered model name")
    pro.add_argument("--version", required=True, help="the model version to promote")
    pro.add_argument("--alias", default=PRODUCTION, help="alias to move (default: %(default)s)")
    pro.add_argument("--trust", required=True, metavar="DIR", help="trusted public keys")
    pro.add_argument("--policy", metavar="TOML", help="gates file, see README (default: no gates)")
    _key_args(pro)
    _registry_arg(pro)
    pro.set_defaults(func=cmd_promote)

    back = commands.add_parser(
        "rollback", help="move an alias back to its previous release (a signed event)"
    )
    back.add_argument("model", metavar="NAME", help="registered model name")
    back.add_argument(
        "--alias", default=PRODUCTION, help="alias to move back (default: %(default)s)"
    )
    _index_trust_arg(back)
    _key_args(back)
    _registry_arg(back)
    back.set_defaults(func=cmd_rollback)

    signer = commands.add_parser(
        "add-signer",
        help="let another key publish and sign the release index (key rotation)",
        description="Adds PUB to the release index's root as a signer (a new root version, "
        "signed by --key). Consumers follow it; put PUB in their trust stores too. Revoking "
        "a key with `revoke --key-id` removes it again.",
    )
    signer.add_argument("--new-key", required=True, metavar="PUB", help="public key to add")
    _index_trust_arg(signer)
    _key_args(signer)
    _registry_arg(signer)
    signer.set_defaults(func=cmd_add_signer)

    ren = commands.add_parser(
        "renew",
        help="re-sign the release index with fresh expiry dates (run at least weekly)",
        description="Consumers refuse index metadata older than its expiry (timestamp: 7 "
        "days), so a registry that publishes nothing for a week must be renewed, e.g. "
        "from cron.",
    )
    _index_trust_arg(ren)
    _key_args(ren)
    _registry_arg(ren)
    ren.set_defaults(func=cmd_renew)

    rev = commands.add_parser(
        "revoke", help="add signing keys or releases to the signed revocation list"
    )
    rev.add_argument(
        "--key-id",
        action="append",
        default=[],
        metavar="KID",
        help="whole key id (64 hex digits) to revoke (repeatable; default: none)",
    )
    rev.add_argument(
        "--digest",
        action="append",
        default=[],
        metavar="DIGEST",
        help="whole release digest (64 hex digits, as `show` prints it) to revoke "
        "(repeatable; default: none)",
    )
    rev.add_argument("--model", metavar="NAME", help="with --version: revoke that release")
    rev.add_argument(
        "--version",
        metavar="V",
        help="with --model: the release the signed index records for this version",
    )
    _index_trust_arg(rev)
    _key_args(rev)
    _registry_arg(rev)
    rev.set_defaults(func=cmd_revoke)


@_unwinds_on_sigterm
def cmd_publish(args: argparse.Namespace) -> int:
    trust = _trust(args)
    key = _signing_key(args)
    # Before the registry opens: it may be a new SQLite file, made only by a publish that
    # can go ahead.
    check_publish(Path(args.source), key=key, alias=args.alias)
    result = publish(
        _store(args, create=True),
        Path(args.source),
        model=args.model,
        key=key,
        trust=trust,
        alias=args.alias,
    )
    what = "published" if result.created else "already published"
    say(
        f"{what}: {result.model} version {result.version} (release {result.release}, "
        f"digest {result.digest[:16]}, key {result.key_id[:16]})"
        + (f", alias {args.alias!r}" if result.created else "")
    )
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store = _store(args)
    models = store.call("list models", lambda: store.client.search_registered_models())
    for m in sorted(models, key=lambda m: m.name):
        aliases = ", ".join(f"{a}→{v}" for a, v in sorted((m.aliases or {}).items()))
        latest = max((int(v.version) for v in m.latest_versions or []), default=0)
        say(f"{m.name}  latest version {latest or '-'}  aliases {aliases or '-'}")
    return 0


def version_facts(version: Any, aliases: list[str]) -> dict[str, Any]:
    """What ``registry show`` says about one model version, from its signed-fact tags."""
    tags = version.tags
    metrics = {k.removeprefix(f"{TAG}metric."): v for k, v in tags.items() if ".metric." in k}
    return {
        "version": str(version.version),
        "release": tags.get(f"{TAG}release", "?"),
        "aliases": sorted(aliases),
        "digest": tags.get(f"{TAG}digest", ""),
        "key_id": tags.get(f"{TAG}key_id", ""),
        "epsilon": tags.get(f"{TAG}epsilon", "?"),
        "metrics": metrics,
        "revoked": tags.get(f"{TAG}revoked", "false") == "true",
        "training_run": version.run_id,
    }


def cmd_show(args: argparse.Namespace) -> int:
    store = _store(args)
    model = store.registered(args.model)
    if model is None:
        raise RegistryError(f"no registered model {args.model!r} at {store.uri}")
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    facts = [version_facts(v, aliases.get(str(v.version), [])) for v in store.versions(args.model)]
    if args.json:
        print(json.dumps({"model": args.model, "versions": facts}, indent=2))
        return 0
    # One block per version, every value whole: a table would cut them to the terminal.
    for f in facts:
        say(f"{args.model} version {f['version']} (release {f['release']})")
        metric = ", ".join(f"{k}={v}" for k, v in f["metrics"].items()) or "-"
        for name, value in (
            ("aliases", ", ".join(f["aliases"]) or "-"),
            ("digest", f["digest"] or "-"),
            ("key id", f["key_id"] or "-"),
            ("ε", f["epsilon"]),
            ("metric", metric),
            ("revoked", "yes" if f["revoked"] else "no"),
            ("run", f["training_run"] or "-"),
        ):
            say(f"  {name:<8} {value}")
    return 0


@_unwinds_on_sigterm
def cmd_promote(args: argparse.Namespace) -> int:
    entry = promote(
        _store(args),
        model=args.model,
        version=str(args.version),
        key=_signing_key(args),
        trust=TrustStore.load(Path(args.trust)),
        policy=Policy.load(Path(args.policy) if args.policy else None),
        alias=args.alias,
    )
    say(f"{args.model}@{args.alias} → version {entry.version} (release {entry.release})")
    return 0


@_unwinds_on_sigterm
def cmd_rollback(args: argparse.Namespace) -> int:
    entry = rollback(
        _store(args),
        model=args.model,
        key=_signing_key(args),
        alias=args.alias,
        trust=_trust(args),
    )
    say(
        f"{args.model}@{args.alias} rolled back to version {entry.version} "
        f"(release {entry.release})"
    )
    return 0


@_unwinds_on_sigterm
def cmd_renew(args: argparse.Namespace) -> int:
    version = renew(_store(args), key=_signing_key(args), trust=_trust(args))
    say(f"release index renewed (timestamp version {version})")
    return 0


@_unwinds_on_sigterm
def cmd_add_signer(args: argparse.Namespace) -> int:
    kid = add_signer(
        _store(args), key=_signing_key(args), public_key=Path(args.new_key), trust=_trust(args)
    )
    say(f"key {kid} may now sign releases and the release index")
    return 0


@_unwinds_on_sigterm
def cmd_revoke(args: argparse.Namespace) -> int:
    store = _store(args)
    versions: set[tuple[str, str]] = set()
    if args.version is not None or args.model is not None:
        if not (args.version and args.model):
            raise RegistryError("--model and --version go together")
        versions.add((args.model, str(args.version)))
    keys, releases = revoke(
        store,
        key=_signing_key(args),
        key_ids=set(args.key_id),
        digests=set(args.digest),
        versions=versions,
        trust=_trust(args),
    )
    if args.version is not None:
        store.call(
            "tag revoked version",
            lambda: store.client.set_model_version_tag(
                args.model, str(args.version), f"{TAG}revoked", "true"
            ),
        )
    say(f"revocation list: {len(keys)} key(s), {len(releases)} release(s)")
    return 0
