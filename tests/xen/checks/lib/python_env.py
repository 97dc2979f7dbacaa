"""The python-environment checks shared by dom0 and the domUs.

They prove the images are usable by every later check: the project and its runtime
deps import with Debian's interpreter (C extensions included), the console scripts are
installed and discoverable through ``importlib.metadata``, and the Xen interfaces the
daemon reads exist.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import shutil
import stat
import sys

from xcheck import CheckReport, read_text, run

PROJECT_MODULES = ("xentmem", "xentmem_cli", "xentmem_selfballoon")
DEPENDENCIES = ("pyxs", "lz4", "psutil", "click")
CONSOLE_SCRIPTS = ("xentmem", "xentmemd", "xentmem-hostd")
BALLOON = "/sys/devices/system/xen_memory/xen_memory0"


def check_imports(report: CheckReport) -> None:
    with report.check("python-env.imports") as step:
        for name in PROJECT_MODULES + DEPENDENCIES:
            importlib.import_module(name)
        import lz4.frame
        import psutil

        payload = bytes(range(256)) * 64
        if lz4.frame.decompress(lz4.frame.compress(payload)) != payload:
            raise AssertionError("lz4 round trip changed the data")
        total = psutil.virtual_memory().total
        versions = ", ".join(
            f"{dist} {importlib.metadata.version(dist)}" for dist in ("xentmem", *DEPENDENCIES)
        )
        step.detail = f"python {sys.version.split()[0]}; {versions}; MemTotal {total >> 20} MiB"


def check_entry_points(report: CheckReport) -> None:
    """Entry points must be discoverable: the daemon finds its backends this way."""
    with report.check("python-env.entry-points") as step:
        dist = importlib.metadata.distribution("xentmem")
        scripts = {ep.name: ep for ep in dist.entry_points if ep.group == "console_scripts"}
        missing = [name for name in CONSOLE_SCRIPTS if name not in scripts]
        not_on_path = [name for name in CONSOLE_SCRIPTS if shutil.which(name) is None]
        if missing or not_on_path:
            raise AssertionError(f"missing entry points {missing}, not on PATH {not_on_path}")
        backend_eps = importlib.metadata.entry_points(group="xentmem.backends")
        backends = sorted(ep.name for ep in backend_eps)
        step.detail = f"console scripts {sorted(scripts)}; xentmem.backends {backends}"
    for name in CONSOLE_SCRIPTS:
        check_console_script(report, name)


def check_console_script(report: CheckReport, name: str) -> None:
    """``<script> --help`` must work once the module it points at exists."""
    with report.check(f"console-script.{name}") as step:
        eps = importlib.metadata.entry_points(group="console_scripts", name=name)
        if not eps:
            raise AssertionError(f"no console_scripts entry point {name}")
        module = next(iter(eps)).module
        if importlib.util.find_spec(module) is None:
            step.skip(f"{module} is not written yet")
        result = run([name, "--help"])
        if result.returncode != 0:
            raise AssertionError(f"exit {result.returncode}: {result.stderr.strip()[-300:]}")
        step.detail = result.stdout.strip().splitlines()[0] if result.stdout.strip() else "ok"


def check_xen_interfaces(report: CheckReport, is_dom0: bool) -> None:
    with report.check("python-env.hypervisor") as step:
        kind = read_text("/sys/hypervisor/type")
        if kind != "xen":
            raise AssertionError(f"/sys/hypervisor/type is {kind!r}")
        capabilities = read_text("/proc/xen/capabilities")
        if ("control_d" in capabilities) != is_dom0:
            raise AssertionError(f"/proc/xen/capabilities {capabilities!r} in the wrong role")
        major = read_text("/sys/hypervisor/version/major")
        minor = read_text("/sys/hypervisor/version/minor")
        step.detail = f"xen {major}.{minor}, capabilities {capabilities!r}"
    with report.check("python-env.xenbus") as step:
        mode = os.stat("/dev/xen/xenbus").st_mode
        if not stat.S_ISCHR(mode):
            raise AssertionError("/dev/xen/xenbus is not a character device")
        step.detail = "/dev/xen/xenbus is a character device"
    with report.check("python-env.balloon") as step:
        target_kb = int(read_text(f"{BALLOON}/target_kb"))
        current_kb = int(read_text(f"{BALLOON}/info/current_kb"))
        if target_kb <= 0 or current_kb <= 0:
            raise AssertionError(f"target_kb={target_kb} current_kb={current_kb}")
        step.detail = f"target_kb={target_kb} current_kb={current_kb}"


def check_all(report: CheckReport, is_dom0: bool) -> None:
    check_imports(report)
    check_entry_points(report)
    check_xen_interfaces(report, is_dom0)
