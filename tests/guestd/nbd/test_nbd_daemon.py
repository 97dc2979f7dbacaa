"""``xentmemd`` serves NBD exports: made over the control socket, served on ``nbd.sock`` in
its run directory (and on loopback TCP when configured), gone before the swap areas are
flushed at a stop."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pytest
from fakes.libnbd_peer import LibNbd, LibNbdError

from xentmem.control import ControlClient, ControlError, protocol
from xentmem.guestd.config import parse_loopback
from xentmem.guestd.nbd.fanout import WORKERS

PAGE = 4096


def default_sized_stacks(pid: int) -> list[str]:
    """Anonymous read-write mappings of RLIMIT_STACK's size (with or without the guard page
    glibc carves out of it): the stacks of threads made at the default size."""
    limit = resource.getrlimit(resource.RLIMIT_STACK)[0]
    found = []
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split()
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if fields[1] == "rw-p" and len(fields) == 5 and high - low in (limit, limit - PAGE):
            found.append(line)
    return found


def test_the_daemon_serves_exports_over_unix_and_loopback_tcp(
        fake_root: Path, tmp_path: Path, start_daemon, libnbd: LibNbd) -> None:
    config = tmp_path / "xentmem.toml"
    config.write_text('[daemon]\nbackend = "zcache"\nnbd_tcp = "127.0.0.1:0"\n')
    daemon = start_daemon(fake_root, config)
    with ControlClient(daemon.socket, timeout=30) as client:
        added = client.call("nbd.add", pages=64, name="s")
        assert added["name"] == "s" and added["size"] == 64 * PAGE
        unix, tcp = added["socket"]
        assert unix == f"unix:{daemon.run_dir / 'nbd.sock'}"
        host, port = tcp.removeprefix("tcp:").rsplit(":", 1)
        assert host == "127.0.0.1"
        over_unix = libnbd.handle()
        over_unix.connect_uri(f"nbd+unix:///s?socket={daemon.run_dir / 'nbd.sock'}")
        over_unix.pwrite(b"\x5a" * 2 * PAGE, 3 * PAGE)
        over_tcp = libnbd.handle()
        over_tcp.connect_uri(f"nbd://{host}:{port}/s")
        assert over_tcp.pread(2 * PAGE, 3 * PAGE) == b"\x5a" * 2 * PAGE
        listed = client.call("nbd.list")
        assert listed["connections"] == 2
        # The real mlockall, in the daemon's process (as root: CAP_IPC_LOCK); the accept
        # thread, both connections' and the page threads were marked I/O flushers or the
        # refusal was counted.
        assert listed["memory_locked"] is True
        assert listed["io_flushers"] + listed["io_flusher_refused"] == 3 + WORKERS
        # Locked memory holds each thread's whole stack: xentmemd's are 1 MiB, not 8.
        assert default_sized_stacks(daemon.proc.pid) == []
        (export,) = listed["exports"]
        assert export["name"] == "s" and export["counts"]["writes"] == 1
        assert export["tmem_pages"] == 2  # through frontswap, into zcache
        over_tcp.shutdown()
        over_tcp.close()
        client.call("nbd.add", pages=8, name="kept")  # a connection stays open at the stop
        with pytest.raises(ControlError) as refused:
            client.call("nbd.add", pages=8, name="kept")
        assert refused.value.code == protocol.BAD_VALUE
        assert client.call("nbd.remove", name="kept")["name"] == "kept"
        with pytest.raises(ControlError) as missing:
            client.call("nbd.remove", name="kept")
        assert missing.value.code == protocol.NOT_FOUND
    assert daemon.stop() == 0  # over_unix is still connected: the stop ends it first
    record = json.loads((daemon.state_dir / "shutdown.json").read_text())
    assert record["clean"], record
    assert not (daemon.run_dir / "nbd.sock").exists()
    with pytest.raises(LibNbdError):  # the server is gone
        over_unix.pread(PAGE, 0)
    over_unix.close()


@pytest.mark.parametrize("text", ["10.0.0.1:10809", "0.0.0.0:10809", "localhost:1",
                                  "127.0.0.1", "127.0.0.1:70000", "[2001:db8::1]:10809",
                                  "127.0.0.1:\u0668\u0660", "127.0.0.1:\uff18\uff10"])
def test_nbd_tcp_is_loopback_only(text: str) -> None:
    with pytest.raises(ValueError):
        parse_loopback(text)


def test_a_config_asking_for_tcp_beyond_loopback_is_refused(fake_root: Path, tmp_path: Path,
                                                           start_daemon) -> None:
    config = tmp_path / "xentmem.toml"
    config.write_text('[daemon]\nnbd_tcp = "0.0.0.0:10809"\n')
    daemon = start_daemon(fake_root, config, wait=False)
    assert daemon.stop(None) != 0
    assert "loopback" in daemon.log()


def test_loopback_addresses_parse() -> None:
    assert parse_loopback("127.0.0.1:10809") == ("127.0.0.1", 10809)
    assert parse_loopback("[::1]:0") == ("::1", 0)
