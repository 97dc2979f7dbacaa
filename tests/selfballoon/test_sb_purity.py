"""The policy modules are pure: no I/O, no clock, no xenstore, not even indirectly."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import xentmem_selfballoon

PACKAGE_DIR = Path(xentmem_selfballoon.__file__).parent
PURE = ("policy.py", "shrink.py", "guard.py")
FORBIDDEN_MODULES = {"os", "time", "pyxs", "psutil", "pathlib", "io", "socket", "subprocess",
                     "threading", "shutil", "tempfile", "logging", "xentmem.clock",
                     "xentmem.roots"}
FORBIDDEN_CALLS = {"open", "print", "input", "exec", "eval", "__import__"}


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("filename", PURE)
def test_pure_module_imports_no_io(filename: str) -> None:
    tree = ast.parse((PACKAGE_DIR / filename).read_text())
    imported = _imports(tree)
    for name in imported:
        top = name.split(".")[0]
        assert name not in FORBIDDEN_MODULES and top not in FORBIDDEN_MODULES, (filename, name)
        # only other pure modules of this package, the stdlib's pure helpers, or typing
        if top == "xentmem_selfballoon":
            assert name.split(".")[-1] + ".py" in PURE or name.endswith(".knobs"), name
    calls = {n.func.id for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & FORBIDDEN_CALLS, (filename, calls & FORBIDDEN_CALLS)


def test_knobs_are_imported_only_for_annotations() -> None:
    tree = ast.parse((PACKAGE_DIR / "policy.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module == "xentmem_selfballoon.knobs":
            pytest.fail("policy.py imports knobs at run time")


def test_importing_the_pure_modules_pulls_in_no_io_library() -> None:
    code = (
        "import sys\n"
        "import xentmem_selfballoon.policy, xentmem_selfballoon.shrink, xentmem_selfballoon.guard\n"
        "bad = sorted(m for m in ('pyxs', 'psutil', 'threading', 'socket', 'subprocess',"
        " 'xentmem.clock', 'xentmem.roots', 'xentmem_selfballoon.inputs') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == ""
