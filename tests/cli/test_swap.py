"""``xentmem swap add | remove | list`` against a real daemon, on a fake kernel.

This machine has no ``nbd`` module, so the kernel's side is faked: ``/sys/block/nbd*`` and
``/proc/swaps`` under a fake root (``XENTMEM_ROOT``), and the tools (``nbd-client``,
``mkswap``, ``swapon``, ``swapoff``) recorded by :class:`FakeTools`, whose ``nbd-client``
really does the NBD handshake (GO) on the socket and export it was given.  Not checked
here: the real tools' own behaviour and the kernel's NBD client.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import pytest

from xentmem.control import ControlClient
from xentmem_cli import swap_kernel
from xentmem_cli.swap import parse_size

PAGE = 4096


class FakeTools:
    def __init__(self, root: Path, fail: str | None = None) -> None:
        self.root = root
        self.fail = fail
        self.calls: list[list[str]] = []
        #: NBD_CMD_RECONFIGURE calls (swap_reconnect's netlink): (index, timeout, fds).
        self.reconfigured: list[tuple[int, int | None, list[int]]] = []

    def reconfigure(self, index: int, dead_conn_timeout_s: int | None = None,
                    fds: Sequence[int] = ()) -> None:
        self.reconfigured.append((index, dead_conn_timeout_s, list(fds)))

    def swaps(self) -> Path:
        return self.root / "proc" / "swaps"

    def __call__(self, argv: Sequence[str]) -> str:
        argv = list(argv)
        self.calls.append(argv)
        if self.fail and argv[0] == self.fail:
            raise swap_kernel.SwapStepFailed(f"{argv[0]}: exit 1: it failed")
        if argv[0] == "modprobe":
            raise swap_kernel.SwapStepFailed("modprobe nbd: exit 1: Module nbd not found")
        if argv[:2] == ["nbd-client", "-d"]:
            (self.root / "sys/block" / Path(argv[2]).name / "pid").unlink()
        elif argv[0] == "nbd-client":
            sock_path, device, name = argv[2], argv[3], argv[argv.index("-N") + 1]
            size = go(sock_path, name)  # the export is there, on that socket, that name
            (self.root / "sys/block" / Path(device).name / "pid").write_text("4242\n")
            (self.root / "sys/block" / Path(device).name / "size").write_text(f"{size // 512}\n")
        elif argv[0] == "swapon":
            priority = argv[argv.index("-p") + 1] if "-p" in argv else -2
            lines = self.swaps().read_text()
            self.swaps().write_text(lines + f"{argv[-1]} partition 1024 0 {priority}\n")
        elif argv[0] == "swapoff":
            kept = [line for line in self.swaps().read_text().splitlines()
                    if not line.startswith(argv[1] + " ")]
            self.swaps().write_text("\n".join(kept) + "\n")
        return ""


def go(path: str, name: str) -> int:
    """NBD_OPT_GO on ``name``, then NBD_CMD_DISC: raises unless the server says ACK; the
    export's size."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(60)
        sock.connect(path)
        sock.recv(18, socket.MSG_WAITALL)
        raw = name.encode()
        data = struct.pack(">I", len(raw)) + raw + struct.pack(">HH", 1, 3)
        sock.sendall(struct.pack(">IQII", 3, 0x49484156454F5054, 7, len(data)) + data)
        size = -1
        while True:
            _, _, reply, length = struct.unpack(">QIII", sock.recv(20, socket.MSG_WAITALL))
            info = sock.recv(length, socket.MSG_WAITALL) if length else b""
            if reply == 3 and info[:2] == b"\0\0":  # NBD_INFO_EXPORT
                size = struct.unpack_from(">Q", info, 2)[0]
            if reply != 3:
                assert reply == 1, f"GO {name}: reply {reply:#x}"
                break
        sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 2, 0, 0, 0))
        return size


@pytest.fixture
def kernel_root(tmp_path: Path) -> Path:
    root = tmp_path / "kroot"
    for n in range(3):
        (root / "sys/block" / f"nbd{n}").mkdir(parents=True)
    (root / "sys/block/nbd0/queue").mkdir()  # nbd1 and nbd2: a kernel without wbt
    (root / "sys/block/nbd0/queue/wbt_lat_usec").write_text("75000\n")
    (root / "proc").mkdir(parents=True)
    (root / "proc/swaps").write_text("Filename Type Size Used Priority\n")
    return root


@pytest.fixture
def tools(kernel_root: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTools:
    fake = FakeTools(kernel_root)
    monkeypatch.setattr(swap_kernel, "run_tool", fake)
    monkeypatch.setattr(swap_kernel, "kernel_reconfigure", fake.reconfigure)
    return fake


@contextmanager
def configured_daemon(base: Path, config_text: str, xentmem_at: Any,
                      state: Path | None = None) -> Iterator[Any]:
    """A daemon started on ``config_text`` (its run and state directories in ``state`` when
    given, so that a second one finds the first's), and ``xentmem`` for it; stopped after,
    which must exit 0."""
    from fakes.guest_daemon import DaemonProcess, make_root
    base.mkdir(exist_ok=True)
    config = base / "xentmem.toml"
    config.write_text(config_text)
    dirs = () if state is None else ("--run-dir", str(state / "run"), "--state-dir",
                                      str(state / "state"))
    process = DaemonProcess(base, make_root(base), config, dirs)
    try:
        process.wait_ready()
        yield xentmem_at(process.socket if state is None else state / "run" / "control.sock")
    finally:
        assert process.stop() == 0


def test_add_list_remove(xentmem, daemon, kernel_root: Path, tools: FakeTools) -> None:
    env = {"XENTMEM_ROOT": str(kernel_root)}
    result = xentmem("swap", "add", "--size", "1M", "--priority", "5", "--json", env=env)
    assert result.exit_code == 0, result.output
    added = json.loads(result.stdout)
    path = added.pop("path")
    assert added == {"name": "swap0", "device": "/dev/nbd0", "pages": 256, "size": 1 << 20,
                     "backing": "file", "priority": 5, "persist_s": 120}
    assert path.endswith("/swap/type-0.swap")  # the daemon's own name for it
    assert tools.reconfigured == [(0, 120, [])]  # dead_conn_timeout, before mkswap
    sock = str(daemon.run_dir / "nbd.sock")
    assert [c[0] for c in tools.calls] == ["nbd-client", "mkswap", "swapon"]
    assert tools.calls[0][:8] == ["nbd-client", "-unix", sock, "/dev/nbd0", "-N", "swap0",
                                  "-b", "4096"]
    assert "-swap" in tools.calls[0]
    assert tools.calls[2] == ["swapon", "--discard=pages", "-p", "5", "/dev/nbd0"]
    # writeback throttling off where the kernel has it (nbd0 here), nothing where not
    assert (kernel_root / "sys/block/nbd0/queue/wbt_lat_usec").read_text() == "0\n"

    second = xentmem("swap", "add", "--size", "64K", "--name", "small", "--json", env=env)
    assert json.loads(second.stdout)["device"] == "/dev/nbd1"  # nbd0 is taken

    rows = json.loads(xentmem("swap", "list", "--json", env=env).stdout)
    assert [(r["name"], r["device"], r["swapon"], r["priority"]) for r in rows] == [
        ("swap0", "/dev/nbd0", True, 5), ("small", "/dev/nbd1", True, -2)]
    assert rows[0]["size"] == 1 << 20

    tools.calls.clear()
    removed = xentmem("swap", "remove", "/dev/nbd0", "--json", env=env)
    assert removed.exit_code == 0, removed.output
    assert tools.calls == [["swapoff", "/dev/nbd0"], ["nbd-client", "-d", "/dev/nbd0"]]
    rows = json.loads(xentmem("swap", "list", "--json", env=env).stdout)
    assert [r["name"] for r in rows] == ["small"]
    assert xentmem("swap", "remove", "small", env=env).exit_code == 0
    assert json.loads(xentmem("swap", "list", "--json", env=env).stdout) == []


def test_a_backing_file_at_a_chosen_path(xentmem, kernel_root: Path, tools: FakeTools,
                                         tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         assert_error) -> None:
    """``--backing FILE``: a new file there (relative to where the command runs), shown by
    ``list``, removed with the export; a file that exists is refused and left as it was."""
    env = {"XENTMEM_ROOT": str(kernel_root)}
    disk = tmp_path / "disk"
    disk.mkdir(mode=0o700)
    monkeypatch.chdir(tmp_path)
    added = xentmem.json("swap", "add", "--size", "64K", "--backing", "disk/../disk/a.swap",
                         env=env)
    assert added["path"] == str(disk / "a.swap") and (disk / "a.swap").is_file()
    memory = xentmem.json("swap", "add", "--size", "64K", "--backing", "memory", env=env)
    assert (memory["backing"], memory["path"]) == ("memory", None)
    rows = xentmem.json("swap", "list", env=env)
    assert [r["backing"] for r in rows] == [str(disk / "a.swap"), "memory"]
    table = xentmem("swap", "list", env=env).stdout
    assert str(disk / "a.swap") in table

    (disk / "b.swap").write_text("kept")
    tools.calls.clear()
    assert_error(xentmem("swap", "add", "--backing", str(disk / "b.swap"), env=env), 1,
                 "exists")
    assert (disk / "b.swap").read_text() == "kept" and tools.calls == []
    assert_error(xentmem("swap", "add", "--backing", "a.swap", env=env), 2,
                 "--backing", "./a.swap")
    assert len(xentmem.json("swap", "list", env=env)) == 2

    assert xentmem("swap", "remove", added["name"], env=env).exit_code == 0
    assert sorted(p.name for p in disk.iterdir()) == ["b.swap"]


@pytest.mark.parametrize(("failing", "undone"), [
    ("mkswap", [["nbd-client", "-d", "/dev/nbd0"]]),
    ("swapon", [["nbd-client", "-d", "/dev/nbd0"]]),
    ("nbd-client", []),
])
def test_a_failed_step_leaves_nothing_behind(xentmem, kernel_root: Path, tools: FakeTools,
                                             assert_error, failing: str, undone) -> None:
    tools.fail = failing
    env = {"XENTMEM_ROOT": str(kernel_root)}
    result = xentmem("swap", "add", "--size", "1M", env=env)
    assert_error(result, 1, failing, "nothing was left behind")
    after = tools.calls[[c[0] for c in tools.calls].index(failing) + 1:]
    assert after == undone
    assert json.loads(xentmem("swap", "list", "--json", env=env).stdout) == []


def test_writeback_throttling_that_cannot_be_turned_off_leaves_nothing_behind(
        xentmem, kernel_root: Path, tools: FakeTools, assert_error) -> None:
    knob = kernel_root / "sys/block/nbd0/queue/wbt_lat_usec"
    knob.unlink()
    knob.mkdir()  # a write to it fails, as a sysfs write the kernel refuses
    env = {"XENTMEM_ROOT": str(kernel_root)}
    result = xentmem("swap", "add", "--size", "1M", env=env)
    assert_error(result, 1, "writeback throttling", "nothing was left behind")
    assert [c[0] for c in tools.calls] == ["nbd-client", "nbd-client"]  # attach, then -d
    assert json.loads(xentmem("swap", "list", "--json", env=env).stdout) == []


def test_without_the_nbd_module_nothing_is_made(xentmem, tmp_path: Path, tools: FakeTools,
                                                assert_error) -> None:
    bare = tmp_path / "bare"
    (bare / "sys/block").mkdir(parents=True)
    env = {"XENTMEM_ROOT": str(bare)}
    assert_error(xentmem("swap", "add", env=env), 1, "modprobe nbd")
    assert json.loads(xentmem("swap", "list", "--json", env=env).stdout) == []


@pytest.mark.parametrize("size", ["12", "1000", "lots", "0"])
def test_a_size_that_is_no_whole_number_of_pages_is_a_usage_error(xentmem, size: str,
                                                                  assert_error) -> None:
    assert_error(xentmem("swap", "add", "--size", size), 2, "--size")


@pytest.mark.parametrize("size", ["\u0664G", "\uff14G", "\u0664\u0660\u0669\u0666", "4\u212a",
                                  "4097M", "5T", "4294971392", "9" * 5000])
def test_a_size_in_other_digits_or_beyond_the_largest_area_is_a_usage_error(
        xentmem, size: str, tools: FakeTools, kernel_root: Path, assert_error) -> None:
    """Fails before: ``\\d`` read Arabic-Indic and fullwidth digits as a size, and a size
    over the daemon's largest area (4 GiB) went on to load the nbd module before the daemon
    refused it; now both are refused first, with nothing run."""
    assert_error(xentmem("swap", "add", "--size", size,
                         env={"XENTMEM_ROOT": str(kernel_root)}), 2, "--size")
    assert tools.calls == []


def test_the_largest_size_is_the_daemons_largest_area() -> None:
    from xentmem.control.protocol import MAX_AREA_PAGES  # one bound: the daemon's

    ctx = click.Context(click.Command("add"))
    assert parse_size(ctx, None, "4G") == parse_size(ctx, None, "4096MiB") == MAX_AREA_PAGES


def test_start_attaches_what_the_config_asks_once_and_stop_turns_it_off(
        tmp_path: Path, kernel_root: Path, tools: FakeTools, xentmem_at) -> None:
    env = {"XENTMEM_ROOT": str(kernel_root)}
    with configured_daemon(tmp_path, "[daemon]\nnbd_swap_mib = 2\n", xentmem_at) as xentmem:
        started = json.loads(xentmem("swap", "start", "--json", env=env).stdout)
        assert started["started"] and started["name"] == "swap-at-start"
        assert started["size"] == 2 << 20 and started["device"] == "/dev/nbd0"
        again = json.loads(xentmem("swap", "start", "--json", env=env).stdout)
        assert again["started"] is False
        # The device is held: it gets a new connection (a live one stays: the kernel
        # replaces only a dead socket), after a handshake with its export.
        assert again["reconnected"] == ["/dev/nbd0"]
        assert [(i, t, len(fds)) for i, t, fds in tools.reconfigured] == [
            (0, 120, 0), (0, None, 1)]
        tools.calls.clear()
        stopped = xentmem("swap", "stop", "--json", env=env)
        assert stopped.exit_code == 0, stopped.output
        assert json.loads(stopped.stdout) == {"stopped": ["/dev/nbd0"]}
        assert tools.calls == [["swapoff", "/dev/nbd0"], ["nbd-client", "-d", "/dev/nbd0"]]
        assert "/dev/nbd0" not in (kernel_root / "proc/swaps").read_text()


def test_start_without_swap_in_the_config_does_nothing(xentmem, kernel_root: Path,
                                                       tools: FakeTools) -> None:
    result = json.loads(xentmem("swap", "start", "--json",
                                env={"XENTMEM_ROOT": str(kernel_root)}).stdout)
    assert result == {"started": False, "why": "nbd_swap_mib is 0", "reconnected": []}
    assert tools.calls == []


def test_after_a_clean_stop_the_next_start_attaches_swap_again(
        tmp_path: Path, kernel_root: Path, tools: FakeTools, xentmem_at) -> None:
    """``systemctl stop`` (swap stop, then the daemon's stop) and ``start``: the guest has its
    swap again, on a fresh area (the old one's pages were read back by swapoff)."""
    env = {"XENTMEM_ROOT": str(kernel_root)}
    for run in ("first", "second"):
        with configured_daemon(tmp_path / run, "[daemon]\nnbd_swap_mib = 2\n", xentmem_at,
                               state=tmp_path) as xentmem:
            started = json.loads(xentmem("swap", "start", "--json", env=env).stdout)
            assert started["started"], (run, started)
            assert xentmem("swap", "stop", env=env).exit_code == 0
        record = json.loads((tmp_path / "state" / "shutdown.json").read_text())
        assert record["nbd_removed"] == ["swap-at-start"]  # its device was detached
        assert list((tmp_path / "state" / "swap").glob("type-*.swap")) == []


def test_start_puts_the_swap_on_the_configured_backing_file(
        tmp_path: Path, kernel_root: Path, tools: FakeTools, xentmem_at) -> None:
    disk = tmp_path / "disk"
    disk.mkdir(mode=0o700)
    env = {"XENTMEM_ROOT": str(kernel_root)}
    text = f'[daemon]\nnbd_swap_mib = 1\nnbd_swap_backing = "{disk}/boot.swap"\n'
    with configured_daemon(tmp_path, text, xentmem_at) as xentmem:
        started = json.loads(xentmem("swap", "start", "--json", env=env).stdout)
        assert started["started"] and started["path"] == str(disk / "boot.swap")
        assert (disk / "boot.swap").is_file()
        assert xentmem("swap", "stop", env=env).exit_code == 0
    assert list(disk.iterdir()) == []  # removed at the stop, with its detached export


@pytest.mark.parametrize("value", ["disk/boot.swap", "/srv/../boot.swap", "", "files"])
def test_a_backing_for_swap_at_start_that_is_no_path_is_refused_at_load(
        tmp_path: Path, value: str) -> None:
    from fakes.guest_daemon import DaemonProcess, make_root
    config = tmp_path / "xentmem.toml"
    config.write_text(f'[daemon]\nnbd_swap_mib = 1\nnbd_swap_backing = "{value}"\n')
    process = DaemonProcess(tmp_path, make_root(tmp_path), config)
    assert process.stop(None) != 0
    assert "nbd_swap_backing" in process.log()


def test_start_replaces_its_export_when_no_device_holds_it(
        tmp_path: Path, kernel_root: Path, tools: FakeTools, xentmem_at) -> None:
    """An export ``swap-at-start`` that came back with the daemon (kept at a stop whose
    disconnect the daemon had not seen yet) while the kernel holds no device for it: its
    swap was off, so start replaces it rather than leave the guest without swap."""
    env = {"XENTMEM_ROOT": str(kernel_root)}
    with configured_daemon(tmp_path, "[daemon]\nnbd_swap_mib = 1\n", xentmem_at) as xentmem:
        with ControlClient(xentmem.socket_path, timeout=30) as client:
            client.call("nbd.add", pages=256, name="swap-at-start", device="/dev/nbd3")
        started = json.loads(xentmem("swap", "start", "--json", env=env).stdout)
        assert started["started"] and started["replaced"] == "swap-at-start"
        assert started["device"] == "/dev/nbd0"
        exports = json.loads(xentmem("swap", "list", "--json", env=env).stdout)
        assert [(e["name"], e["device"]) for e in exports] == [("swap-at-start", "/dev/nbd0")]
        again = json.loads(xentmem("swap", "start", "--json", env=env).stdout)
        assert again["started"] is False and "replaced" not in again  # nbd0 is held
