"""install-deps.sh against a stand-in apt: it waits for locks and retries transient failures.

The script runs with stub ``apt-get``, ``dpkg-query``, ``id`` and ``sleep`` first on PATH, so
no package is touched, nothing needs root and nothing sleeps.  ``apt-get`` plays a script of
outcomes (one per call) and records each call's arguments; ``sleep`` records its argument.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "install-deps.sh"
LISTS_LOCK = (
    "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 812 (apt-get)\n"
    "E: Unable to lock directory /var/lib/apt/lists/"
)
FRONTEND_LOCK = (
    "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 907 "
    "(unattended-upgr)\n"
    "E: Unable to acquire the dpkg frontend lock (/var/lib/dpkg/lock-frontend), is another "
    "process using it?"
)
NOT_FOUND = "E: Unable to locate package xen-hypervisor-4.17-amd64"

STUB_APT_GET = """#!/bin/bash
# One outcome per call from $STUBS/outcomes ("rc message"; no line left: rc 0).
printf '%s\\n' "$*" >>"$STUBS/apt-calls"
n=$(( $(wc -l <"$STUBS/apt-calls") ))
line=$(sed -n "${n}p" "$STUBS/outcomes")
rc=${line%% *}
[ -n "$line" ] && printf '%b\\n' "${line#* }"
exit "${rc:-0}"
"""
STUB_DPKG_QUERY = "#!/bin/sh\nexit 1\n"  # no package installed
STUB_ID = "#!/bin/sh\necho 0\n"  # root
STUB_SLEEP = '#!/bin/sh\necho "$1" >>"$STUBS/sleeps"\n'


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("apt-get", STUB_APT_GET), ("dpkg-query", STUB_DPKG_QUERY),
                       ("id", STUB_ID), ("sleep", STUB_SLEEP)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    (tmp_path / "outcomes").write_text("")
    return tmp_path


def run_script(stubs: Path, outcomes: list[tuple[int, str]]) -> subprocess.CompletedProcess[str]:
    """install-deps.sh with apt-get answering ``outcomes`` in turn (then succeeding)."""
    lines = [f"{rc} {message}".replace("\n", "\\n") for rc, message in outcomes]
    (stubs / "outcomes").write_text("".join(line + "\n" for line in lines))
    env = {**os.environ, "STUBS": str(stubs), "PATH": f"{stubs / 'bin'}:{os.environ['PATH']}"}
    env.pop("XENTMEM_APT_UPDATE", None)
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def calls(stubs: Path) -> list[str]:
    path = stubs / "apt-calls"
    return path.read_text().splitlines() if path.exists() else []


def commands(stubs: Path) -> list[str]:
    """``update`` or ``install`` for each apt-get call."""
    return ["update" if call.endswith(" update") else "install" for call in calls(stubs)]


def sleeps(stubs: Path) -> list[str]:
    path = stubs / "sleeps"
    return path.read_text().splitlines() if path.exists() else []


pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_every_apt_get_call_waits_for_the_dpkg_lock(stubs: Path) -> None:
    result = run_script(stubs, [])
    assert result.returncode == 0, result.stderr
    assert commands(stubs) == ["update", "install"]
    assert all("-o DPkg::Lock::Timeout=" in call for call in calls(stubs))
    assert sleeps(stubs) == []


def test_a_held_lists_lock_is_waited_out_with_a_message(stubs: Path) -> None:
    result = run_script(stubs, [(100, LISTS_LOCK), (100, LISTS_LOCK)])
    assert result.returncode == 0, result.stderr
    assert commands(stubs) == ["update", "update", "update", "install"]
    assert len(sleeps(stubs)) == 2
    assert result.stderr.count("apt-get update failed (E: Could not get lock") == 2
    assert "try 2 of" in result.stderr and "try 3 of" in result.stderr


def test_a_held_frontend_lock_at_install_is_retried(stubs: Path) -> None:
    result = run_script(stubs, [(0, ""), (100, FRONTEND_LOCK)])
    assert result.returncode == 0, result.stderr
    assert commands(stubs) == ["update", "install", "install"]
    assert "apt-get install failed (E: Could not get lock /var/lib/dpkg/lock-frontend" in \
        result.stderr


def test_retries_are_bounded_and_the_failure_is_reported(stubs: Path) -> None:
    result = run_script(stubs, [(100, LISTS_LOCK)] * 10)
    assert result.returncode == 1
    made = commands(stubs)
    assert 1 < len(made) < 10 and set(made) == {"update"}
    assert len(sleeps(stubs)) == len(made) - 1
    assert f"apt-get update failed {len(made)} times: E: Could not get lock" in result.stderr
    assert "apt-get update failed (full log:" in result.stderr


def test_a_failure_that_is_not_transient_is_not_retried(stubs: Path) -> None:
    result = run_script(stubs, [(0, ""), (100, NOT_FOUND)])
    assert result.returncode == 1
    assert len(calls(stubs)) == 2
    assert sleeps(stubs) == []
    assert NOT_FOUND in result.stderr
