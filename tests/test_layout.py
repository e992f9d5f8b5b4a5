"""The house rules of the layout: one folder per program, imports pointing down. Read from the source (every
import, a function's lazy ones included), so a rule is broken the moment the line is written, not when some
test happens to run the path. What runs where: README.md, "Where things live"."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROGRAMS = ("api", "worker", "ops", "modeltools", "sdfleet", "shared")

# what each folder must never import (a module, or every module under a package)
FORBIDDEN = {
    "api": ("worker", "ops", "modeltools", "sdfleet"),
    "worker": ("api", "ops", "sdfleet", "modeltools"),  # but for ALLOWED
    "ops": ("api", "worker", "modeltools", "sdfleet"),
    "modeltools": ("api", "ops", "sdfleet"),
    "shared": ("api", "worker", "ops", "modeltools", "sdfleet"),
}


# the exceptions: the worker resolves hub IDs (SDFLEET_MODEL=ORG/NAME) as the model tools do
ALLOWED = {"worker": ("modeltools", "modeltools.hub")}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, absolute, with its line."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's own package up
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in (*parts, base) if p)
            # `from pkg import mod` imports pkg.mod when mod is a module
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
            found.append((node.lineno, base))
    return found


def violations(folder: str) -> list[str]:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for line, module in imports_of(path):
            if module in ALLOWED.get(folder, ()):
                continue
            for banned in FORBIDDEN[folder]:
                if module == banned or module.startswith(banned + "."):
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return sorted(set(bad))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_imports_point_down(folder):
    assert violations(folder) == []


def test_the_rules_see_a_broken_one(tmp_path, monkeypatch):
    """The checker itself: a lazy import inside a function, and a relative one, are both caught; the worker's
    one exception (hub IDs) stays one."""
    pkg = tmp_path / "shared"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text("def f():\n    from worker import tasks\n")
    (pkg / "worse.py").write_text("from ..api import app\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert violations("shared") == ["shared/bad.py:2 imports worker", "shared/bad.py:2 imports worker.tasks",
                                    "shared/worse.py:1 imports api", "shared/worse.py:1 imports api.app"]
    worker = tmp_path / "worker"
    worker.mkdir()
    (worker / "ok.py").write_text("from modeltools import hub\n")
    (worker / "no.py").write_text("from modeltools.steps import convert\n")
    assert violations("worker") == ["worker/no.py:1 imports modeltools.steps",
                                    "worker/no.py:1 imports modeltools.steps.convert"]


def test_every_program_folder_is_a_package_of_the_distribution():
    pyproject = (ROOT / "pyproject.toml").read_text()
    for folder in PROGRAMS:
        assert (ROOT / folder / "__init__.py").is_file(), folder
        assert f'"{folder}*"' in pyproject, f"{folder} is not in pyproject's packages"
