"""Each benchmark still runs at a tiny size, prints its summary and exits 0.

Speed is judged by the benchmarks' own ratios, never here: this only keeps them from rotting
when the code they drive changes.  A bench exits 1 when it reports its own failure (a target
missed, a daemon that did not stop cleanly), so only 0 passes.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fakes.libnbd_peer import fio_unavailable_reason
from fakes.required import unavailable

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.mark.parametrize(
    ("script", "args", "summary"),
    [
        ("bench_pages.py", ["--pages", "200", "--repeat", "1", "--part", "zcache"],
         "SUMMARY: put"),
        ("bench_pages.py", ["--pages", "300", "--repeat", "1", "--part", "arena", "--no-zram"],
         "ARENA SUMMARY"),
        ("bench_pages.py", ["--pages", "300", "--repeat", "1", "--part", "store"],
         "STORE SUMMARY"),
        ("bench_pages.py", ["--pages", "300", "--repeat", "1", "--part", "hostd"],
         "HOSTD SUMMARY"),
        ("bench_selfballoon.py", ["--traces", "steady,bursts", "--duration", "600"],
         "summary: guard cuts"),
        ("bench_control.py", ["--pages", "50", "--idle-seconds", "1"], "SUMMARY: socket"),
        ("bench_xen.py", ["--ops", "20", "--rounds", "1"], "SUMMARY"),
        ("bench_mock_xenstored.py", ["--ops", "50", "--rounds", "1"], "SUMMARY: server"),
        ("bench_nbd.py", ["--size-mib", "1", "--no-zram"], "SUMMARY: iodepth 32"),
        ("bench_ramster.py", ["--pages", "200", "--repeat", "1", "--masters", "3"],
         "SUMMARY: 3m remotify"),
    ],
)
def test_benchmark_runs(script: str, args: list[str], summary: str) -> None:
    if script == "bench_nbd.py":
        reason = fio_unavailable_reason() or (
            None if shutil.which("nbdkit") else "nbdkit is missing (apt-get install nbdkit)")
        if reason is not None:
            unavailable("NBD", "fio and nbdkit", reason)
    result = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary in result.stdout, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
