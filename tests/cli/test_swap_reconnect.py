"""Reconnecting an NBD swap device after ``xentmemd`` died: the netlink messages (encoded
here; this machine has no ``nbd`` module), the handshake against a real daemon's export,
and ``xentmem swap start`` after a SIGKILL and a restart, on a fake kernel root."""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path

import pytest
from fakes.guest_daemon import DaemonProcess, make_root
from test_swap import FakeTools

from xentmem.control import ControlClient
from xentmem_cli import swap_kernel, swap_reconnect
from xentmem_cli.swap_reconnect import (
    NBD_ATTR_DEAD_CONN_TIMEOUT,
    NBD_ATTR_INDEX,
    NBD_ATTR_SOCKETS,
    NBD_CMD_RECONFIGURE,
    NBD_SOCK_FD,
    NBD_SOCK_ITEM,
    ReconnectFailed,
    parse_attributes,
    reconfigure_message,
)

PAGE = 4096


def test_reconfigure_carries_index_timeout_and_nested_sockets() -> None:
    message = reconfigure_message(family=29, index=3, dead_conn_timeout_s=120, fds=[7, 9],
                                  sequence=5)
    length, kind, flags, sequence, port = struct.unpack_from("=IHHII", message)
    assert (length, kind, flags, sequence, port) == (len(message), 29, 0x5, 5, 0)
    assert message[16:20] == struct.pack("=BBH", NBD_CMD_RECONFIGURE, 1, 0)
    attributes = parse_attributes(message[20:])
    assert struct.unpack("=I", attributes[NBD_ATTR_INDEX]) == (3,)
    assert struct.unpack("=Q", attributes[NBD_ATTR_DEAD_CONN_TIMEOUT]) == (120,)
    items = []
    offset, raw = 0, attributes[NBD_ATTR_SOCKETS]
    while offset < len(raw):  # two SOCK_ITEMs: parse_attributes keeps one per type
        size, item_kind = struct.unpack_from("=HH", raw, offset)
        assert item_kind & 0x7FFF == NBD_SOCK_ITEM and item_kind & 0x8000  # nested
        items.append(parse_attributes(raw[offset + 4:offset + size])[NBD_SOCK_FD])
        offset += (size + 3) & ~3
    assert [struct.unpack("=I", i)[0] for i in items] == [7, 9]
    bare = parse_attributes(reconfigure_message(29, 0)[20:])
    assert set(bare) == {NBD_ATTR_INDEX}


def test_the_handshake_reaches_transmission_or_names_the_refusal(daemon) -> None:
    with ControlClient(daemon.socket, timeout=30) as client:
        client.call("nbd.add", pages=16, name="s")
    path = str(daemon.run_dir / "nbd.sock")
    connected = swap_reconnect.handshake(path, "s", 30)
    with connected.sock:
        assert connected.size == 16 * PAGE and connected.flags & 1  # NBD_FLAG_HAS_FLAGS
        # Transmission phase: a READ of page 0 is answered (a simple reply, zeroes).
        connected.sock.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, PAGE))
        reply = connected.sock.recv(16 + PAGE, 0x100)  # MSG_WAITALL
        assert reply[:16] == struct.pack(">IIQ", 0x67446698, 0, 1) and reply[16:] == bytes(PAGE)
    with pytest.raises(ReconnectFailed, match="'nope': refused"):
        swap_reconnect.handshake(path, "nope", 30)
    with pytest.raises(ReconnectFailed, match="No such file"):
        swap_reconnect.handshake(str(daemon.run_dir / "absent.sock"), "s", 30)


def test_a_device_of_another_size_is_not_reconnected(daemon, tmp_path: Path) -> None:
    with ControlClient(daemon.socket, timeout=30) as client:
        client.call("nbd.add", pages=16, name="s")
    root = tmp_path / "kroot"
    (root / "sys/block/nbd2").mkdir(parents=True)
    (root / "sys/block/nbd2/size").write_text(f"{32 * PAGE // 512}\n")
    calls: list[tuple[int, list[int]]] = []
    kernel = swap_kernel.Kernel(
        swap_kernel.Roots(root=root),
        reconfigure=lambda index, dead_conn_timeout_s=None, fds=(): calls.append(
            (index, list(fds))))
    with pytest.raises(swap_kernel.SwapStepFailed, match="not the same export"):
        kernel.reconnect(str(daemon.run_dir / "nbd.sock"), "s", "/dev/nbd2")
    assert calls == []
    (root / "sys/block/nbd2/size").write_text(f"{16 * PAGE // 512}\n")
    kernel.reconnect(str(daemon.run_dir / "nbd.sock"), "s", "/dev/nbd2")
    assert [(i, len(fds)) for i, fds in calls] == [(2, 1)]


def test_after_a_sigkill_the_restarted_daemon_gets_its_device_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, xentmem_at) -> None:
    """swap add (with --persist), kill -9, restart, swap start: the device reconnects."""
    kroot = tmp_path / "kroot"
    for n in range(2):
        (kroot / "sys/block" / f"nbd{n}").mkdir(parents=True)
    (kroot / "proc").mkdir()
    (kroot / "proc/swaps").write_text("Filename Type Size Used Priority\n")
    tools = FakeTools(kroot)
    monkeypatch.setattr(swap_kernel, "run_tool", tools)
    monkeypatch.setattr(swap_kernel, "kernel_reconfigure", tools.reconfigure)
    env = {"XENTMEM_ROOT": str(kroot)}
    root = make_root(tmp_path)
    process = DaemonProcess(tmp_path, root, None, ("-o", "backend=zcache"))
    process.wait_ready()
    xentmem = xentmem_at(process.socket)
    added = json.loads(xentmem("swap", "add", "--size", "256K", "--name", "s", "--persist",
                               "600", "--json", env=env).stdout)
    assert added["persist_s"] == 600 and tools.reconfigured == [(0, 600, [])]
    process.send(signal.SIGKILL)
    assert process.stop(None) == -signal.SIGKILL

    (tmp_path / "notify.sock").unlink()  # the helper's, not the daemon's: the same paths
    process = DaemonProcess(tmp_path, root, None, ("-o", "backend=zcache"))
    try:
        process.wait_ready()
        xentmem = xentmem_at(process.socket)
        started = xentmem("swap", "start", "--json", env=env)
        assert started.exit_code == 0, started.output
        assert json.loads(started.stdout)["reconnected"] == ["/dev/nbd0"]
        assert [(i, t, len(fds)) for i, t, fds in tools.reconfigured[1:]] == [(0, None, 1)]
    finally:
        assert process.stop() == 0


def test_generic_netlink_framing_against_this_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The family lookup is real: this kernel answers for its controller family (id 16)
    and names what is missing when no nbd module is loaded."""
    if (Path("/sys/module/nbd")).exists():
        assert swap_reconnect.NbdNetlink().family > 0
    else:
        with pytest.raises(ReconnectFailed, match=r"no nbd netlink family.*ENOENT"):
            swap_reconnect.NbdNetlink()
    monkeypatch.setattr(swap_reconnect, "NBD_FAMILY", "nlctrl")
    with swap_reconnect.NbdNetlink() as netlink:
        assert netlink.family == swap_reconnect.GENL_ID_CTRL
