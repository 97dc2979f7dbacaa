"""``systemd/xentmem.service``: systemd accepts it, and it says what the daemon needs.

``systemd-analyze verify`` checks that the ``ExecStart=`` binary exists, so the shipped unit
is verified unchanged inside a temporary root that holds the installed ``xentmemd`` at the
path the unit names, ``kill`` for ``ExecReload=`` and a copy of this machine's unit
directory (for ``multi-user.target`` and friends).  verify only warns, with exit 0, about an
unknown key or a bad value, so any output at all fails the test.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "xentmem.service"
SYSTEM_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None,
                                   reason="systemd-analyze is not installed (apt install systemd)")


def directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value assigned, in order (keys repeat in unit files)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} before any section"
        key, sep, value = line.partition("=")
        assert sep, f"not a directive: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return directives(UNIT)


def one(unit: dict[str, dict[str, list[str]]], section: str, key: str) -> str:
    values = unit[section].get(key)
    assert values, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times"
    return values[0]


def installed_daemon() -> Path:
    """The ``xentmemd`` console script of the environment running the tests."""
    beside = Path(sys.executable).with_name("xentmemd")
    found = beside if beside.exists() else shutil.which("xentmemd")
    if found is None:
        pytest.fail("xentmemd is not installed in this environment (pip install -e .)")
    return Path(found)


@pytest.fixture(scope="module")
def install_root(tmp_path_factory: pytest.TempPathFactory,
                 unit: dict[str, dict[str, list[str]]]) -> Iterator[Path]:
    """A root with the unit installed as a package would install it."""
    root = tmp_path_factory.mktemp("root")
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system/xentmem.service")
    for command in (one(unit, "Service", key) for key in
                    ("ExecStart", "ExecReload", "ExecStartPost", "ExecStop")):
        binary = Path(command.split()[0].lstrip("-@:+!"))
        source = (installed_daemon().with_name(binary.name)
                  if binary.name in ("xentmemd", "xentmem") else shutil.which(binary.name))
        assert source is not None, f"{binary.name} not found to install at {binary}"
        # a bare name is looked up on systemd's PATH: a package puts it in /usr/bin
        target = root / (binary.relative_to("/") if binary.is_absolute() else "usr/bin" / binary)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
    system_dir = next((d for d in SYSTEM_UNIT_DIRS if (d / "multi-user.target").exists()), None)
    if system_dir is None:
        pytest.skip("this machine has no systemd unit directory to verify against")
    shutil.copytree(system_dir, root / "usr/lib/systemd/system", symlinks=True)
    yield root


@needs_analyze
def test_systemd_analyze_verify_passes_on_the_shipped_unit(install_root: Path) -> None:
    result = subprocess.run(
        [ANALYZE, "verify", f"--root={install_root}", "xentmem.service"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_analyze
def test_verify_would_catch_a_bad_directive(install_root: Path, tmp_path: Path) -> None:
    """The check above can fail: the same set-up with one bad value produces output."""
    broken = install_root / "etc/systemd/system/xentmem-broken.service"
    broken.write_text(UNIT.read_text().replace("ProtectSystem=strict", "ProtectSystem=sideways"))
    try:
        result = subprocess.run(
            [ANALYZE, "verify", f"--root={install_root}", broken.name],
            capture_output=True, text=True, timeout=60,
        )
    finally:
        broken.unlink()
    assert "sideways" in result.stdout + result.stderr


@needs_analyze
def test_security_exposure_stays_low(install_root: Path) -> None:
    """``systemd-analyze security`` scores 0 (locked down) to 10; we keep it at or under 2.0."""
    result = subprocess.run(
        [ANALYZE, "security", "--offline=yes", f"--root={install_root}", "--threshold=20",
         "--no-pager", "xentmem.service"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_notify_ready_watchdog_and_restart(unit: dict[str, dict[str, list[str]]]) -> None:
    assert one(unit, "Service", "Type") == "notify"
    assert one(unit, "Service", "NotifyAccess") == "main"
    assert one(unit, "Service", "Restart") == "on-failure"
    assert one(unit, "Service", "WatchdogSec").rstrip("s").isdigit()
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    # bare: found on systemd's PATH whether a package (/usr/bin) or pip (/usr/local/bin) put it
    assert one(unit, "Service", "ExecStart").split()[0] == "xentmemd"
    assert one(unit, "Install", "WantedBy") == "multi-user.target"


def test_a_refused_config_is_not_restarted_in_a_loop(unit: dict[str, dict[str, list[str]]]) -> None:
    from xentmem.console import EXIT_CONFIG

    assert one(unit, "Service", "RestartPreventExitStatus") == str(EXIT_CONFIG)


def test_ordering_after_xenbus_never_blocks_a_machine_without_xen(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    after = " ".join(unit["Unit"]["After"]).split()
    assert "proc-xen.mount" in after and "xenstored.service" in after
    # Wants= (not Requires=/BindsTo=): a missing or skipped proc-xen.mount is no failure.
    assert "proc-xen.mount" in " ".join(unit["Unit"].get("Wants", []))
    for hard in ("Requires", "Requisite", "BindsTo"):
        assert hard not in unit["Unit"], f"{hard}= would stop the unit where Xen is absent"
    conditions = [k for k in unit["Unit"] if k.startswith(("Condition", "Assert"))]
    assert conditions == [], "the daemon falls back to zcache: no condition may refuse a start"


def test_hardening_keeps_the_balloon_writable(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "ProtectKernelTunables") == "yes"
    # "-": the directory is absent off Xen, and a missing path must not fail the start.
    assert service["ReadWritePaths"] == ["-/sys/devices/system/xen_memory"]
    assert one(unit, "Service", "RuntimeDirectory") == "xentmem"
    # writing target_kb is capable(CAP_SYS_ADMIN) in the balloon driver; the other two are
    # swap's (test_swap_serving_gets_exactly_what_staying_resident_needs).
    assert one(unit, "Service", "CapabilityBoundingSet").split() == [
        "CAP_SYS_ADMIN", "CAP_IPC_LOCK", "CAP_SYS_RESOURCE"]
    assert "User" not in service and "DynamicUser" not in service  # root owns target_kb
    assert "PrivateUsers" not in service  # would make CAP_SYS_ADMIN useless on the host
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectKernelModules", "ProtectKernelLogs",
                "ProtectControlGroups", "LockPersonality", "MemoryDenyWriteExecute",
                "RestrictRealtime", "RestrictSUIDSGID", "RestrictNamespaces", "PrivateNetwork"):
        assert one(unit, "Service", key) == "yes", key
    assert one(unit, "Service", "ProtectHome") in ("yes", "read-only", "tmpfs")
    assert one(unit, "Service", "RestrictAddressFamilies") == "AF_UNIX"
    assert service["SystemCallFilter"][0] == "@system-service"
    assert one(unit, "Service", "SystemCallArchitectures") == "native"


def test_swap_areas_survive_a_stop(unit: dict[str, dict[str, list[str]]]) -> None:
    """systemd removes RuntimeDirectory= when the unit stops, so the swap files and maps that
    shutdown writes go to StateDirectory= (the daemon reads $STATE_DIRECTORY), which stays."""
    from xentmem.guestd.swap import DEFAULT_STATE_DIR

    assert one(unit, "Service", "StateDirectory") == "xentmem"
    assert DEFAULT_STATE_DIR == "/var/lib/xentmem"
    assert int(one(unit, "Service", "StateDirectoryMode"), 8) & 0o077 == 0


def test_zcache_pages_survive_a_kill(unit: dict[str, dict[str, list[str]]]) -> None:
    """zcache's arena is in the run directory (tmpfs): kept across a restart, so a daemon
    killed with its swap pages in tmem finds them again (docs/zcache.md, "Restart")."""
    from xentmem.guest.backends.zcache import ARENA_FILE
    from xentmem.roots import DEFAULT_RUN_DIR

    assert one(unit, "Service", "RuntimeDirectory") == "xentmem"
    assert DEFAULT_RUN_DIR == "/run/xentmem" and ARENA_FILE == "zcache.arena"
    assert one(unit, "Service", "RuntimeDirectoryPreserve") == "yes"


def test_what_outlives_a_kill_stays_out_of_swap(unit: dict[str, dict[str, list[str]]]) -> None:
    """The arena's pages, unlocked once the daemon died, must not go to the NBD swap device
    they serve: the restarted daemon would wait on that dead device to read its arena (the
    real-Xen bed's swap.daemon-killed-resumed, docs/nbd.md)."""
    assert one(unit, "Service", "MemorySwapMax") == "0"



def test_devices_allow_xenbus_and_keep_proc_readable(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    service = unit["Service"]
    # PrivateDevices=yes would hide /dev/xen/xenbus; the device ACL allows exactly it.
    assert one(unit, "Service", "PrivateDevices") == "no"
    assert one(unit, "Service", "DevicePolicy") == "closed"
    assert service["DeviceAllow"] == ["/dev/xen/xenbus rw"]
    # A fresh /proc would hide /proc/xen (xenfs: capabilities tells dom0 from a guest) and,
    # with ProcSubset=pid, /proc/meminfo, zoneinfo and pressure/memory.
    assert "ProcSubset" not in service and "ProtectProc" not in service


def test_the_file_parses_as_plain_ini() -> None:
    """No duplicate sections or stray text a packager's tooling might choke on."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]


def test_nbd_swap_is_off_before_the_daemon_stops(unit: dict[str, dict[str, list[str]]]) -> None:
    """ExecStop= runs before systemd signals the daemon: swap on its NBD devices is turned
    off while the server still answers (docs/nbd.md)."""
    assert one(unit, "Service", "ExecStop") == "+xentmem swap stop"
    assert one(unit, "Service", "ExecStartPost") == "-+xentmem swap start"


def test_swap_serving_gets_exactly_what_staying_resident_needs(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    """mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT) with CAP_IPC_LOCK (the kernel then skips
    RLIMIT_MEMLOCK, so no LimitMEMLOCK=), prctl(PR_SET_IO_FLUSHER) with CAP_SYS_RESOURCE, and
    both system calls through the filter (docs/nbd.md)."""
    service = unit["Service"]
    caps = one(unit, "Service", "CapabilityBoundingSet").split()
    assert {"CAP_IPC_LOCK", "CAP_SYS_RESOURCE"} <= set(caps)
    assert "LimitMEMLOCK" not in service  # redundant with CAP_IPC_LOCK: no more than needed
    assert "AmbientCapabilities" not in service  # root: the bounding set is what it keeps
    filters = service["SystemCallFilter"]
    assert filters[0] == "@system-service"  # holds @memlock (mlockall) and @process (prctl)
    for denied in filters[1:]:
        assert denied.startswith("~")
        assert not {"@memlock", "@process", "mlockall", "prctl"} & set(denied[1:].split())


@needs_analyze
def test_the_filter_lets_mlockall_and_prctl_through() -> None:
    """What the groups hold, asked of this machine's systemd rather than assumed."""
    def members(group: str) -> set[str]:
        out = subprocess.run([ANALYZE, "syscall-filter", group], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        return {line.strip() for line in out.splitlines()
                if line.strip() and not line.strip().startswith("#")}

    service = members("@system-service")
    assert "@memlock" in service and "@process" in service
    assert "mlockall" in members("@memlock") and "prctl" in members("@process")
    assert not {"mlockall", "prctl"} & members("@resources")  # the unit denies ~@resources
