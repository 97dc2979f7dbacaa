"""The bed's check code off Xen: its deadline, its verdicts, and a lint against fixed waits.

The checks run inside the emulated guests, whose speed depends on the host's load: a wait
that ends after a fixed number of seconds fails a busy host (a 240 s wait did), so every
wait follows the bed's deadline (``xcheck.time_left``).  ``test_no_check_waits_a_fixed_time``
keeps it that way.
"""

from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

CHECKS = Path(__file__).resolve().parent / "checks"
LIB = CHECKS / "lib"


@pytest.fixture
def xcheck(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    monkeypatch.syspath_prepend(str(LIB))
    sys.modules.pop("xcheck", None)
    import xcheck

    yield xcheck
    sys.modules.pop("xcheck", None)


def load_script(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """A check script as a module (its main() does not run: it is not ``__main__``)."""
    path = CHECKS / name
    loader = importlib.machinery.SourceFileLoader(f"check_{path.name.replace('-', '_')}",
                                                  str(path))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, loader.name, module)  # dataclasses look it up
    loader.exec_module(module)
    return module


def check_scripts() -> list[Path]:
    """Every Python file of the bed's checks (scripts have no suffix, libraries .py)."""
    found = []
    for path in sorted(CHECKS.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and \
                (path.suffix == ".py" or path.read_text(errors="replace").startswith(
                    "#!/usr/bin/python3")):
            found.append(path)
    return found


# -- the deadline ------------------------------------------------------------------------------


class FakeTime:
    def __init__(self, wall: float, mono: float) -> None:
        self.wall, self.mono = wall, mono

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


def test_time_left_counts_down_to_the_deadline_less_the_report_margin(
        xcheck: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeTime(wall=1_000_000.0, mono=50.0)
    monkeypatch.setattr(xcheck, "time", clock)
    monkeypatch.setenv("XENTMEM_DEADLINE", "1000300")
    monkeypatch.setattr(xcheck, "_DEADLINE", xcheck._deadline_from_env())
    assert xcheck.time_left() == 300 - xcheck.REPORT_MARGIN_S
    clock.mono += 250.0  # the wall clock is read once: a step of it later changes nothing
    clock.wall += 10_000.0
    assert xcheck.time_left() == 50 - xcheck.REPORT_MARGIN_S
    clock.mono += 100.0
    assert xcheck.time_left() == 0.0


def test_without_a_deadline_a_script_tried_by_hand_gets_the_unset_figure(
        xcheck: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xcheck, "time", FakeTime(wall=5.0, mono=7.0))
    monkeypatch.delenv("XENTMEM_DEADLINE", raising=False)
    monkeypatch.setattr(xcheck, "_DEADLINE", xcheck._deadline_from_env())
    assert xcheck.time_left() == xcheck.UNSET_DEADLINE_S - xcheck.REPORT_MARGIN_S


def test_wait_signal_fails_at_the_deadline_not_after_a_figure(
        xcheck: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XENTMEM_ROLE", "dom0")
    monkeypatch.setattr(xcheck, "STATE_DIR", tmp_path)
    monkeypatch.setattr(xcheck, "time_left", lambda: 0.0)
    with pytest.raises(TimeoutError, match="by the bed's deadline"):
        xcheck.wait_signal("bed-domu1")
    (tmp_path / "signals").mkdir()
    (tmp_path / "signals" / "bed-domu1").write_text("domu1\n")
    assert xcheck.wait_signal("bed-domu1") == "domu1"


# -- verdicts that must hold however slow the guest was ---------------------------------------


@pytest.fixture
def xentmemd_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(LIB))
    return load_script("domu/50-xentmemd", monkeypatch)


STORED = {offset: bytes([offset]) * 4096 for offset in range(24)}
CLEAN = {"clean": True, "backend": "xen", "frontswap_curr_pages": 0}


def test_stop_after_self_shrinking_moved_every_page_is_clean(xentmemd_check: ModuleType) -> None:
    """Nothing left in tmem to repatriate at unload, every page in the file: no loss."""
    summary = {**CLEAN, "repatriated": 0}
    assert xentmemd_check.shutdown_problems(summary, STORED, dict(STORED)) == []


def test_stop_judges_the_pages_not_where_they_were(xentmemd_check: ModuleType) -> None:
    kept = dict(STORED)
    del kept[3]
    kept[5] = bytes(4096)
    kept[99] = bytes(4096)
    problems = xentmemd_check.shutdown_problems({**CLEAN, "repatriated": 22}, STORED, kept)
    assert problems == ["swap area after stop: missing [3], different [5], never stored [99]"]
    assert xentmemd_check.shutdown_problems({**CLEAN, "repatriated": 25}, STORED, STORED) == [
        "25 pages repatriated at unload, 24 were stored"]
    unclean = {**CLEAN, "clean": False, "frontswap_curr_pages": 2, "repatriated": 22}
    assert len(xentmemd_check.shutdown_problems(unclean, STORED, STORED)) == 2


# -- no fixed waits ----------------------------------------------------------------------------

WAITING_METHODS = frozenset({"get", "wait", "join", "wait_for", "select"})


def fixed_waits(path: Path) -> list[str]:
    """Numbers used as a wait's bound: ``timeout=<n>``, ``x.wait(<n>)``, ``WAIT_S = <n>``."""
    tree = ast.parse(path.read_text(), str(path))
    found = []

    def number(node: ast.AST) -> bool:
        return isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            for keyword in node.keywords:
                if keyword.arg == "timeout" and number(keyword.value):
                    found.append(f"line {node.lineno}: timeout={ast.unparse(keyword.value)}")
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in WAITING_METHODS and \
                    any(number(arg) and arg.value > 0 for arg in node.args):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.Assign) and number(node.value):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id.endswith(
                        ("TIMEOUT", "TIMEOUT_S", "WAIT_S")):
                    found.append(f"line {node.lineno}: {target.id} = {ast.unparse(node.value)}")
    return found


def test_the_lint_finds_fixed_waits(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("WAIT_S = 240.0\nrun(['xl'], timeout=60)\nq.get(60.0)\nq.get(time_left())\n"
                      "sock.recv(65536)\n")
    assert fixed_waits(sample) == ["line 1: WAIT_S = 240.0", "line 2: timeout=60",
                                   "line 3: q.get(60.0)"]


def test_no_check_waits_a_fixed_time() -> None:
    scripts = check_scripts()
    assert len(scripts) >= 10
    found = {str(path.relative_to(CHECKS)): fixed_waits(path) for path in scripts}
    assert {name: waits for name, waits in found.items() if waits} == {}
