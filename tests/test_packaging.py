"""The distribution installs exactly four top-level import names: server, clients,
strategies, registry. A fifth (a ``utils`` beside them, say) would import in this source
tree and fail once installed, or be installed under a name another distribution owns."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import setuptools

ROOT = Path(__file__).resolve().parents[1]
TOP_LEVEL = {"server", "clients", "strategies", "registry"}
NOT_INSTALLED = {"tests", "scripts"}  # run from the source tree only


def test_the_installed_distribution_provides_exactly_the_four_names() -> None:
    dist = importlib.metadata.distribution("fedlora")
    listed = dist.read_text("top_level.txt")
    assert listed is not None, "fedlora's metadata has no top_level.txt"
    assert set(listed.split()) == TOP_LEVEL


def test_the_package_discovery_of_pyproject_finds_exactly_the_four_names() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    finder = (
        setuptools.find_namespace_packages
        if find.get("namespaces", True)
        else setuptools.find_packages
    )
    packages = finder(
        where=str(ROOT / find.get("where", ["."])[0]),
        include=find.get("include", ["*"]),
        exclude=find.get("exclude", []),
    )
    assert {p.split(".")[0] for p in packages} == TOP_LEVEL


def test_no_other_top_level_python_code_sits_beside_them() -> None:
    importable = {
        path.name
        for path in ROOT.iterdir()
        if path.is_dir() and not path.name.startswith(".") and any(path.glob("*.py"))
    } | {path.stem for path in ROOT.glob("*.py")}
    assert importable - NOT_INSTALLED == TOP_LEVEL
