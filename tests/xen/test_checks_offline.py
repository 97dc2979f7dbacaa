"""The bed's check code off Xen: its deadline, its verdicts, and a lint against fixed waits.

The checks run inside the emulated guests, whose speed depends on the host's load: a wait
that ends after a fixed number of seconds fails a busy host (a 240 s wait did), so every
wait follows the bed's deadline (``xcheck.time_left``).  ``test_no_check_waits_a_fixed_time``
keeps it that way.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

CHECKS = Path(__file__).resolve().parent / "checks"
LIB = CHECKS / "lib"


def fresh_lib_module(name: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """checks/lib/<name>.py imported afresh for one test, and forgotten after it."""
    monkeypatch.syspath_prepend(str(LIB))
    sys.modules.pop(name, None)
    yield importlib.import_module(name)
    sys.modules.pop(name, None)


@pytest.fixture
def xcheck(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from fresh_lib_module("xcheck", monkeypatch)


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


# -- NBD swap (domu/60-swap, lib/swapload.py, dom0/during-domu/07-swap-host-tmem) ----------------


@pytest.fixture
def swapload(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    yield from fresh_lib_module("swapload", monkeypatch)


def test_swapload_finds_every_kind_of_damaged_page(swapload: ModuleType) -> None:
    load = swapload.Load(600, seed=7, free=lambda: (1 << 30, 0))
    assert load.write() == 600
    assert load.verify() == {"checked": 600, "bad": 0, "first_bad": []}
    first = load.chunks[0]
    first[5 * 4096 + 100] ^= 1                                      # a flipped bit
    first[6 * 4096:7 * 4096] = bytes(4096)                          # a page of zeroes
    first[7 * 4096:8 * 4096] = swapload.make_page(9, 7)             # another page's copy
    verdict = load.verify()
    assert verdict["bad"] == 3
    assert verdict["first_bad"] == ["page 5: checksum mismatch", "page 6: zeroes",
                                    "page 7: intact page 9 of seed 7 in its place"]
    assert swapload.page_problem(swapload.make_page(3, 8), 3, 7) == \
        "intact page 3 of seed 8 in its place"


def test_swapload_release_keeps_every_nth_chunk_and_verifies_them(swapload: ModuleType) -> None:
    load = swapload.Load(4 * swapload.CHUNK_PAGES + 10, seed=1, free=lambda: (1 << 30, 0))
    load.write()
    kept = load.release(4)
    assert kept == swapload.CHUNK_PAGES + 10                       # chunks 0 and 4
    assert load.verify() == {"checked": kept, "bad": 0, "first_bad": []}


def test_swapload_waits_for_free_memory_until_its_deadline_only(
        swapload: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    looks = []

    def low() -> tuple[int, int]:
        looks.append(1)
        return 0, 1 << 20

    monkeypatch.setattr(swapload, "FREE_POLL_S", 0.0)
    past = swapload.time.time() - 1
    load = swapload.Load(40, seed=1, deadline=past, free=low)
    assert load.write() == 40                                       # the deadline ends the wait
    assert len(looks) == 2                                          # every FREE_CHECK_EVERY pages
    assert not swapload.behind(0, 0)         # memory low, nothing written: allocate, reclaim
    assert swapload.behind(0, 4) and swapload.behind(1 << 30, swapload.MAX_WRITEBACK_KB + 1)
    assert not swapload.behind(swapload.MIN_FREE_KB, swapload.MAX_WRITEBACK_KB)


@pytest.fixture
def swap_check(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """checks/lib/swapcheck.py, which 60-swap and 65-swap-killed share (60-swap loads too)."""
    monkeypatch.syspath_prepend(str(LIB))
    sys.modules.pop("swapcheck", None)
    load_script("domu/60-swap", monkeypatch)
    import swapcheck

    yield swapcheck
    sys.modules.pop("swapcheck", None)


def test_swap_verdicts_count_every_page(swap_check: ModuleType) -> None:
    good = {"phase": "verified", "round": 1, "checked": 10, "bad": 0, "first_bad": []}
    assert swap_check.verdict_problem(good, 10) == ""
    assert "expected 11 checked" in swap_check.verdict_problem(good, 11)
    bad = {**good, "bad": 1, "first_bad": ["page 3: zeroes"]}
    assert "page 3: zeroes" in swap_check.verdict_problem(bad, 10)
    assert "expected a verification" in swap_check.verdict_problem({"phase": "written"}, 10)


def test_swap_judges_only_the_kernel_lines_of_its_phase(
        swap_check: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(swap_check, "kernel_log", lambda: [
        "[   10.000000] INFO: task python3:99 blocked for more than 120 seconds.",
        "[  200.500000] block nbd0: Connection timed out",
        "<3>[  201.000000] blk_update_request: I/O error, dev nbd0, sector 8",
        "[  202.000000] Adding 262140k swap on /dev/nbd0.",
        "no stamp: I/O error"])
    bad, nbd_lines = swap_check.kernel_problems(200.0)
    assert bad == ["<3>[  201.000000] blk_update_request: I/O error, dev nbd0, sector 8"]
    assert nbd_lines == 3
    assert swap_check.through_mib({"pages_to_tmem": 3000, "pages_to_backing": 1096}) == 16.0


@pytest.fixture
def host_check(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(LIB))
    return load_script("dom0/during-domu/07-swap-host-tmem", monkeypatch)


def run_host_check(host_check: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                   script: list[tuple[dict[int, int], list[str]]]) -> list[str]:
    """07's verdicts for listings in turn, each with the signals sent by then."""
    import io

    signals = tmp_path / "signals"
    signals.mkdir()
    steps = iter(script)

    def listing() -> dict[int, int]:
        pages, words = next(steps)
        for word in words:
            (signals / word).write_text("domu1\n")
        return pages

    out = io.StringIO()
    monkeypatch.setattr(host_check, "STATE_DIR", tmp_path)
    monkeypatch.setattr(host_check, "SAMPLE_POLL_S", 0.0)
    monkeypatch.setattr(host_check, "domids", lambda: {"domu1": 3})
    monkeypatch.setattr(host_check, "persistent_pages", listing)
    monkeypatch.setattr(host_check, "CheckReport", lambda: real_report(out))
    host_check.main()
    return out.getvalue().splitlines()


def real_report(out: object) -> object:
    sys.modules.pop("xcheck", None)
    import xcheck

    return xcheck.CheckReport(out)  # type: ignore[arg-type]


def test_host_check_passes_a_rise_over_the_lowest_count_before_the_start(
        host_check: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lines = run_host_check(host_check, monkeypatch, tmp_path, [
        ({3: 300}, []), ({3: 100}, []), ({3: 150}, ["swap-xen-start-first"]),
        ({3: 1200}, []), ({3: 900}, ["swap-xen-end-first"])])
    assert lines[0].startswith("XENTMEM-CHECK domu1/swap.in-host-tmem PASS domid 3: "
                               "persistent pages 100 before the load, peak 1200")


def test_host_check_fails_a_small_rise_and_a_domu_that_never_started(
        host_check: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    lines = run_host_check(host_check, monkeypatch, tmp_path, [
        ({3: 0}, ["swap-xen-start-first"]), ({3: 1000}, ["swap-xen-end-first"])])
    assert lines[0].startswith("XENTMEM-CHECK domu1/swap.in-host-tmem FAIL")
    (tmp_path / "again").mkdir()
    lines = run_host_check(host_check, monkeypatch, tmp_path / "again", [({3: 0}, ["bed-domu1"])])
    assert "never signalled the start" in lines[0]
