"""``fedlora edge serve|pull|verify``: the operator's commands on an edge machine.

`server.cli` finds `edge_group` through the ``fedlora.commands`` entry points. The registry
is ``--registry URI`` or ``MLFLOW_TRACKING_URI`` with read-only credentials in
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``; the admin token of
``POST /v1/refresh`` comes from ``FEDLORA_EDGE_TOKEN``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from clients.edge.settings import (
    DEFAULT_ESCALATE_BELOW,
    MAX_ITEMS,
    TOKEN_ENV,
    UPSTREAM_KEY_ENV,
    EdgeSettings,
    ModelRef,
)
from clients.task.choices import DEFAULT_BASE
from clients.task.errors import ConfigError

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
EXIT_REFUSED = 1
DEFAULT_CACHE = Path("~/.cache/fedlora/edge")


def edge_group(sub: argparse._SubParsersAction) -> None:
    edge = sub.add_parser("edge", help="edge inference node: serve, pull, verify")
    commands = edge.add_subparsers(dest="edge_command", required=True, metavar="EDGE_COMMAND")

    serve = commands.add_parser(
        "serve",
        help="serve verified adapters over HTTP and follow their aliases",
        description="Load the base once, pull each --model's alias, verify it (signature, "
        "revocation, freshness, base digest, --max-epsilon), serve it, and swap in new "
        f"releases without dropping requests. POST /v1/refresh needs ${TOKEN_ENV}.",
    )
    serve.add_argument("--model", action="append", required=True, metavar="NAME[@ALIAS]",
                       help="model to serve (alias default: production); repeatable")  # fmt: skip
    serve.add_argument("--trust", required=True, metavar="DIR", help="trusted public keys")
    serve.add_argument(
        "--base", default=DEFAULT_BASE, metavar="PATH", help="base model (default: %(default)s)"
    )
    serve.add_argument(
        "--quantization",
        default="none",
        choices=("none", "4bit"),
        help="load the base in 4-bit NF4 or not (default: %(default)s)",
    )
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s)"
    )
    serve.add_argument("--port", type=int, default=8080, help="HTTP port (default: %(default)s)")
    serve.add_argument(
        "--poll-seconds",
        type=float,
        default=30.0,
        help="seconds between checks of each alias (default: %(default)s)",
    )
    serve.add_argument(
        "--refresh-timeout-s",
        type=float,
        default=600.0,
        help="longest one refresh (index, download, verification) may take before its "
        "worker process is stopped and the refresh fails (default: %(default)s)",
    )
    serve.add_argument(
        "--cache",
        default=str(DEFAULT_CACHE),
        metavar="DIR",
        help="verified releases and the node's state (default: %(default)s)",
    )
    serve.add_argument(
        "--registry", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)"
    )
    serve.add_argument(
        "--max-epsilon",
        type=float,
        help="refuse releases with a larger ε, or without DP (default: no limit)",
    )
    serve.add_argument(
        "--max-loaded",
        type=int,
        default=4,
        help="previous releases kept loaded (default: %(default)s)",
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=0,
        help="inference threads, at most 1024; 0 is half the cores (default: %(default)s)",
    )
    for flag, default, what in (
        ("--max-items", 64, f"texts or prompts per request, at most {MAX_ITEMS}"),
        ("--max-text-chars", 4000, "characters per text or prompt"),
        ("--max-new-tokens", 64, "largest max_tokens a request may ask for"),
        ("--max-batch", 32, "texts or prompts per batched forward"),
        ("--max-queue", 256, "requests waiting per base; more get 503 with Retry-After"),
    ):
        serve.add_argument(flag, type=int, default=default, help=f"{what} (default: %(default)s)")
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=2.0,
        help="how long a batch may wait for more requests while others wait (default: %(default)s)",
    )
    serve.add_argument(
        "--body-timeout-s",
        type=float,
        default=30.0,
        help="seconds to receive a request's body; a slower one gets 408 (default: %(default)s)",
    )
    routing = serve.add_argument_group(
        "hybrid routing",
        "Escalate low-confidence classifications to an upstream fedlora node where the "
        f"residency policy allows and the burst budget remains; its key comes from "
        f"${UPSTREAM_KEY_ENV}. Without --policy nothing leaves.",
    )
    routing.add_argument(
        "--upstream",
        metavar="URL",
        help="base URL of the upstream node, e.g. https://cloud:8080 "
        "(default: none, everything is answered here)",
    )
    routing.add_argument(
        "--upstream-model",
        metavar="NAME",
        help="model to ask upstream (default: the local model's name)",
    )
    routing.add_argument(
        "--escalate-below",
        type=float,
        default=DEFAULT_ESCALATE_BELOW,
        metavar="P",
        help="escalate answers whose top score is below P "
        "(default: %(default)s, chosen with scripts/bench_hybrid.py)",
    )
    routing.add_argument(
        "--policy", metavar="FILE", help="residency policy (TOML; default: nothing leaves the node)"
    )
    routing.add_argument(
        "--upstream-timeout-s",
        type=float,
        default=2.0,
        help="deadline of each upstream call (default: %(default)s)",
    )
    routing.add_argument(
        "--breaker-failures",
        type=int,
        default=3,
        help="upstream failures in a row that open the circuit breaker (default: %(default)s)",
    )
    routing.add_argument(
        "--breaker-backoff-s",
        type=float,
        default=5.0,
        help="first back-off of an open breaker; doubles while the upstream "
        "stays down, up to 300 s (default: %(default)s)",
    )
    serve.add_argument(
        "--verbose",
        action="store_true",
        help="also log other libraries' warnings (uvicorn's, urllib3's; default: off, "
        "only their errors; MLflow logs its warnings itself)",
    )
    # A service's log: each line says when (a refresh that stalls, a refusal, an outage).
    serve.set_defaults(func=cmd_serve, log_timestamps=True)

    pull = commands.add_parser("pull", help="download and verify NAME@ALIAS into a PEFT directory")
    pull.add_argument("ref", metavar="NAME@ALIAS", help="the model and alias to pull")
    pull.add_argument("--trust", required=True, metavar="DIR", help="trusted public keys")
    pull.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="where the verified PEFT directory goes: absent, empty or an earlier pull's "
        "output, which is replaced (no default)",
    )
    pull.add_argument("--base", metavar="PATH", help="refuse a release trained on another base")
    pull.add_argument(
        "--max-epsilon",
        type=float,
        help="refuse a release with a larger ε, or without DP (default: no limit)",
    )
    pull.add_argument(
        "--state",
        default="~/.cache/fedlora/pull",
        metavar="DIR",
        help="keeps the last verified release index, for replay protection (default: %(default)s)",
    )
    pull.add_argument(
        "--registry", metavar="URI", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)"
    )
    pull.set_defaults(func=cmd_pull)

    verify = commands.add_parser("verify", help="verify a release directory offline")
    verify.add_argument("directory", metavar="DIR", help="the release directory")
    verify.add_argument("--trust", required=True, metavar="DIR", help="trusted public keys")
    verify.add_argument("--base", metavar="PATH", help="also check the base-model digest")
    verify.set_defaults(func=cmd_verify)


def _registry_uri(value: str | None) -> str:
    from registry.mlflow_store import default_uri

    return value or default_uri()


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from clients.edge import listener
    from clients.edge.app import create_app
    from clients.edge.node import EdgeNode
    from clients.edge.residency import ResidencyPolicy

    settings = EdgeSettings(
        models=tuple(ModelRef.parse(m) for m in args.model),
        trust=Path(args.trust),
        cache=Path(args.cache).expanduser(),
        registry_uri=_registry_uri(args.registry),
        base=args.base,
        quantization=args.quantization,
        host=args.host,
        port=args.port,
        poll_seconds=args.poll_seconds,
        refresh_timeout_s=args.refresh_timeout_s,
        max_epsilon=args.max_epsilon,
        admin_token=EdgeSettings.token_from_env(),
        max_loaded=args.max_loaded,
        threads=args.threads,
        max_items=args.max_items,
        max_text_chars=args.max_text_chars,
        max_new_tokens=args.max_new_tokens,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        batch_wait_ms=args.batch_wait_ms,
        body_timeout_s=args.body_timeout_s,
        upstream=args.upstream,
        upstream_model=args.upstream_model,
        escalate_below=args.escalate_below,
        policy=Path(args.policy) if args.policy else None,
        upstream_timeout_s=args.upstream_timeout_s,
        breaker_failures=args.breaker_failures,
        breaker_backoff_s=args.breaker_backoff_s,
        upstream_key=EdgeSettings.upstream_key_from_env(),
    )
    router_policy = ResidencyPolicy.load(settings.policy) if settings.policy else None
    # Bound now, so a port in use fails in milliseconds rather than after the model loads.
    sockets = listener.bind(settings.host, settings.port)
    try:
        node = EdgeNode(settings)
    except BaseException:
        listener.close(sockets)
        raise
    try:
        node.start()
        if unknown := node.unknown_models():
            # A warning, not a refusal: a node may be deployed before its model's first
            # release (it serves 503 until then); a typo is what this line catches.
            known = ", ".join(repr(m) for m in node.index_models or ()) or "none yet"
            err.print(
                Text(
                    f"warning: --model {', '.join(repr(m) for m in unknown)}: the registry's "
                    f"release index has no such model (its models: {known}); unavailable "
                    "until a release of it is published"
                )
            )
        for name, model in node.health()["models"].items():
            err.print(f"{name}@{model['alias']}: {model['status']} (version {model['version']}"
                      + (f"; {model['reason']}" if model["reason"] else "") + ")")  # fmt: skip
        if settings.upstream:
            err.print(
                f"escalating below {settings.escalate_below} to {settings.upstream}; policy: "
                + (router_policy.source if router_policy else "none, nothing leaves")
            )
        listener.listen(sockets, settings.host, settings.port)
        err.print(f"serving on http://{settings.host}:{settings.port} (docs at /docs)")
        # No X-Forwarded-* rewriting (uvicorn trusts it from 127.0.0.1 by default; the node
        # never uses the client's address) and no access log: per-request work off the path.
        # No log config of uvicorn's own: its records go to the root handler, in the node's
        # format (time stamps) and under its filter (errors; warnings with --verbose).
        server = uvicorn.Server(
            uvicorn.Config(
                create_app(node),
                host=settings.host,
                port=settings.port,
                log_config=None,
                log_level="warning",
                proxy_headers=False,
                access_log=False,
            )
        )
        server.run(sockets=sockets)
    finally:
        node.close()  # the app's lifespan closes it too; this covers a failed start
        listener.close(sockets)
    # uvicorn.run's own check: a server that never started (its lifespan failed) has
    # logged why.
    return 0 if server.started else 1


def cmd_pull(args: argparse.Namespace) -> int:
    from clients.task.model import base_digest
    from registry.keys import TrustStore
    from registry.mlflow_store import MlflowStore
    from registry.policy import LocalPolicy
    from registry.pull import check_out, pull

    ref = ModelRef.parse(args.ref)
    check_out(Path(args.out))  # before the registry is asked anything
    release = pull(
        MlflowStore(_registry_uri(args.registry), create=False),  # a pull makes no registry
        model=ref.name,
        alias=ref.alias,
        trust=TrustStore.load(Path(args.trust)),
        out=Path(args.out),
        state=Path(args.state).expanduser(),
        policy=LocalPolicy(
            base_digest=base_digest(args.base) if args.base else None,
            max_epsilon=args.max_epsilon,
        ),
    )
    prov = release.provenance
    out.print(f"{ref}: release {prov.release} verified (digest {release.digest[:16]}, "
              f"key {release.key_id[:16]}) → {args.out}")  # fmt: skip
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from clients.task.model import base_digest
    from registry.accept import accept
    from registry.errors import VerificationError
    from registry.keys import TrustStore

    directory = Path(args.directory)
    if not directory.is_dir():
        raise ConfigError(f"{str(directory)!r} is not a directory")
    try:
        # Offline: no index, so neither revocation nor alias freshness can be checked.
        accepted = accept(
            directory,
            trust=TrustStore.load(Path(args.trust)),
            model=None,
            index=None,
            alias=None,
            base_digest=base_digest(args.base) if args.base else None,
        )
    except VerificationError as exc:
        err.print(f"[red]refused ({exc.reason}):[/red] {escape(exc.detail)}", highlight=False)
        return EXIT_REFUSED
    prov = accepted.provenance
    out.print(f"verified: {prov.model_name} release {prov.release}, digest {accepted.digest}, "
              f"key {accepted.key_id}, ε {prov.epsilon()}")  # fmt: skip
    return 0
