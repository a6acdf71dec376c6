"""Import directions, checked on the source of every module of the four packages and scripts.

The layers, lowest first; a module imports only from its own package or a lower layer:

    clients.task -> strategies -> registry -> {clients.site, clients.edge, server}

Packages sharing a layer never import each other: clients.site and clients.edge do not,
and neither they nor server import one another (a site or an edge node runs without the
server's code, and the server without theirs). Nothing imports a ``cli`` module:
``fedlora``'s subcommands reach each other through the ``fedlora.commands`` entry points
in pyproject.toml, and library code lives outside the CLIs (tests may call a CLI's
``main``; scripts may not import one). On top of the layers, some packages stay free of
heavy or unneeded third-party libraries (`THIRD_PARTY_BANS`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, ...]] = [
    ("clients.task",),
    ("strategies",),
    ("registry",),
    ("clients.site", "clients.edge", "server"),
]
PACKAGES = [package for layer in LAYERS for package in layer]
THIRD_PARTY_BANS: dict[str, tuple[str, ...]] = {
    # Pure numpy maths: no deep-learning, tracking or DP-training stack.
    "strategies": ("torch", "peft", "mlflow", "transformers", "opacus"),
    "registry": ("flwr",),
    "clients.edge": ("flwr", "opacus"),
    "clients.task": ("flwr", "mlflow"),
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _package(name: str) -> str | None:
    """The package of a dotted module name (``clients`` itself counts as the lowest)."""
    if name == "clients":
        return "clients.task"
    return next((p for p in PACKAGES if _within(name, p)), None)


def _layer(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def imports(source: str) -> set[str]:
    """Every absolute module a source imports, anywhere in it (``from a import b`` gives
    both ``a`` and ``a.b``, since ``b`` may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def violations(module: str, imported: set[str]) -> list[str]:
    """Why ``module`` may not import some of ``imported`` (empty when all is well)."""
    bad = []
    for name in sorted(imported):
        if _package(name) is not None and name.split(".")[-1] == "cli":
            bad.append(f"{name}: nothing imports a cli module")
    own = _package(module)
    if own is None:  # a script: only the cli rule applies
        return bad
    for name in sorted(imported):
        other = _package(name)
        if other is None or other == own:
            continue
        if _layer(other) > _layer(own):
            bad.append(f"{name}: {other} is a higher layer than {own}")
        elif _layer(other) == _layer(own):
            bad.append(f"{name}: {other} and {own} share a layer and never import each other")
    for package, banned in THIRD_PARTY_BANS.items():
        if _within(module, package):
            bad += [
                f"{name}: banned in {package}"
                for name in sorted(imported)
                if any(_within(name, b) for b in banned)
            ]
    return bad


def _sources() -> list[tuple[str, Path]]:
    out = []
    for top in ("strategies", "registry", "clients", "server", "scripts"):
        for path in sorted((ROOT / top).rglob("*.py")):
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out.append((dotted, path))
    return out


SOURCES = _sources()


@pytest.mark.parametrize(("module", "path"), SOURCES, ids=[m for m, _ in SOURCES])
def test_import_directions(module: str, path: Path) -> None:
    bad = violations(module, imports(path.read_text(encoding="utf-8")))
    assert not bad, f"{module} imports {bad}"


def test_the_checker_sees_imports() -> None:
    assert "flwr.app" in imports((ROOT / "server" / "loop.py").read_text(encoding="utf-8"))
    assert "server.settings.RunSettings" in imports("from server.settings import RunSettings")
    assert "server.cli" in imports("def f():\n    from server import cli\n")


@pytest.mark.parametrize(
    ("module", "imported", "why"),
    [
        ("registry.pull", "server.settings", "higher layer"),
        ("strategies.dp", "registry.keys", "higher layer"),
        ("clients.task.model", "clients.site.ledger", "higher layer"),
        ("clients.site.app", "clients.edge.node", "share a layer"),
        ("clients.edge.node", "clients.site.ledger", "share a layer"),
        ("server.app", "clients.site.settings", "share a layer"),
        ("clients.site.app", "server.settings", "share a layer"),
        ("server.demo", "server.cli", "cli module"),
        ("server.cli", "clients.site.cli", "cli module"),
        ("scripts.bench_round", "server.cli", "cli module"),
        ("strategies.fedavg", "torch.nn", "banned in strategies"),
        ("registry.lifecycle", "flwr.app", "banned in registry"),
        ("clients.edge.runtime", "opacus", "banned in clients.edge"),
    ],
)
def test_each_rule_can_fail(module: str, imported: str, why: str) -> None:
    found = violations(module, {imported})
    assert found and why in found[0], found


@pytest.mark.parametrize(
    ("module", "imported"),
    [
        ("server.app", "registry.lifecycle"),
        ("clients.edge.node", "registry.pull"),
        ("registry.pull", "clients.task.files"),
        ("strategies.dp", "clients.task.errors"),
        ("server.console", "server.settings"),
        ("scripts.bench_round", "server.harness.flower"),
        ("server.app", "flwr.serverapp"),
    ],
)
def test_allowed_directions_pass(module: str, imported: str) -> None:
    assert violations(module, {imported}) == []
