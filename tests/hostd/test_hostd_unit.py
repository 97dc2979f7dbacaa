"""``systemd/xentmem-hostd.service``: systemd accepts it, unchanged, and it says what the
service needs.  ``systemd-analyze verify`` checks that ``ExecStart=`` exists, so the unit is
verified inside a temporary root holding the installed ``xentmem-hostd`` at the path the unit
names; verify only warns (exit 0) about a bad key or value, so any output fails the test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "xentmem-hostd.service"
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
ANALYZE = shutil.which("systemd-analyze")


def directives() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key, []).append(value)
    return sections


@pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_is_silent(tmp_path: Path) -> None:
    system_dir = next((d for d in SYSTEM_UNIT_DIRS if (d / "multi-user.target").exists()), None)
    if system_dir is None:
        pytest.skip("this machine has no systemd unit directory to verify against")
    script = Path(sys.executable).with_name("xentmem-hostd")
    found = script if script.exists() else shutil.which("xentmem-hostd")
    if found is None:
        pytest.fail("xentmem-hostd is not installed in this environment (pip install -e .)")
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, tmp_path / "etc/systemd/system" / UNIT.name)
    target = tmp_path / "usr/bin/xentmem-hostd"
    target.parent.mkdir(parents=True)
    shutil.copy(found, target)
    shutil.copytree(system_dir, tmp_path / "usr/lib/systemd/system", symlinks=True)
    result = subprocess.run([ANALYZE, "verify", f"--root={tmp_path}", UNIT.name],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


def test_the_unit_runs_the_service_in_dom0_only_without_capabilities() -> None:
    unit = directives()
    service = unit["Service"]
    assert service["ExecStart"] == ["xentmem-hostd run"]  # on systemd's PATH
    assert service["Type"] == ["notify"] and service["WatchdogSec"] == ["30s"]
    assert service["RuntimeDirectory"] == ["xentmem-hostd"]  # its control socket's home
    assert service["CapabilityBoundingSet"] == [""]
    assert service["DeviceAllow"] == ["/dev/xen/xenbus rw"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert unit["Unit"]["ConditionPathExists"] == ["/proc/xen/capabilities"]
    assert "xenstored.service" in unit["Unit"]["After"][0]
    # Debian 12: /etc/init.d/xen mounts xenfs and starts xenstored, as xen.service
    assert "xen.service" in unit["Unit"]["After"][0].split()


def test_a_crash_keeps_the_run_directory_and_restarts_the_service() -> None:
    """The page arena, the state table and the guests' sessions live in the run directory
    (docs/protocol.md §10): kept across a restart, and the service restarted on a crash.
    The service finds the directory in $RUNTIME_DIRECTORY, which systemd sets."""
    from xentmem.hostd.runstate import ARENA_FILE

    service = directives()["Service"]
    assert service["RuntimeDirectoryPreserve"] == ["yes"]
    assert service["Restart"] == ["on-failure"]
    assert ARENA_FILE == "arena"
