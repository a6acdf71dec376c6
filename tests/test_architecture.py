"""Import directions from STYLE.md, checked on the source of every module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package prefix -> module prefixes it must not import
FORBIDDEN = {
    "strategies": (
        "torch",
        "peft",
        "mlflow",
        "transformers",
        "opacus",
        "clients.site",
        "server",
        "registry",
    ),
    "registry": ("flwr",),
    "clients.edge": ("flwr", "opacus"),
    "clients.task": ("flwr", "mlflow", "server", "clients.site", "clients.edge"),
    # The server may use the shared task library, never a site's or an edge node's code.
    "server": ("clients.site", "clients.edge"),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for package in ("strategies", "registry", "clients", "server"):
        for path in sorted((ROOT / package).rglob("*.py")):
            dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out.append((dotted, path))
    return out


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_import_directions(module: str, path: Path) -> None:
    for package, banned in FORBIDDEN.items():
        if module == package or module.startswith(package + "."):
            bad = sorted(
                name
                for name in _imports(path)
                if any(name == b or name.startswith(b + ".") for b in banned)
            )
            assert not bad, f"{module} imports {bad}, forbidden for {package}"


def test_the_checker_sees_imports() -> None:
    assert "flwr.app" in _imports(ROOT / "server" / "loop.py")
