"""Each benchmark still runs and prints its summary (tiny sizes; no figure is asserted).

Speed is judged by the benchmarks' own ratios, never here: this only keeps them from rotting
when the code they drive changes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    ("script", "args", "summary"),
    [
        ("bench_pages.py", ["--pages", "200", "--repeat", "1"], "SUMMARY: put"),
        ("bench_selfballoon.py", [], "summary: guard cuts"),
        ("bench_control.py", ["--pages", "50", "--idle-seconds", "1"], "SUMMARY: socket"),
        ("bench_xen.py", ["--ops", "20", "--rounds", "1"], "SUMMARY"),
    ],
)
def test_benchmark_runs(script: str, args: list[str], summary: str) -> None:
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert summary in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
