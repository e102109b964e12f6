"""The structure rules of README's "Architecture" section, checked on the source itself.

- The import contract in pyproject.toml ([tool.importlinter]): layers whose imports point down only, and no
  import cycles in any package; import-linter counts every import, lazy ones inside functions included.
- No function in src/ is longer than MAX_FUNCTION_LINES.
- No public name of a package shadows one of its submodules or subpackages (``import convforge.train.engine``
  and ``convforge.train`` must both mean the package).
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import subprocess
import sys
import types
from pathlib import Path

import convforge

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "convforge"
MAX_FUNCTION_LINES = 100


def test_import_contract_holds():
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "2 kept, 0 broken" in report, report


def test_no_function_is_longer_than_the_limit():
    long_ones = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_ones.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({length} lines)")
    assert not long_ones, long_ones


def test_no_public_name_shadows_a_submodule():
    shadowed = []
    packages = [convforge] + [importlib.import_module(info.name)
                              for info in pkgutil.walk_packages(convforge.__path__, "convforge.") if info.ispkg]
    for package in packages:
        for info in pkgutil.iter_modules(package.__path__):
            if info.name == "__main__":  # importing it runs the command line
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            value = getattr(package, info.name)
            if not isinstance(value, types.ModuleType) or value is not module:
                shadowed.append(f"{package.__name__}.{info.name} is {type(value).__name__}, not the module")
    assert not shadowed, shadowed
