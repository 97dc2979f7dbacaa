"""End to end: ``xentmemd`` as a subprocess on a fake root without Xen, driven by the client.

It picks zcache by itself (``auto``), runs the balloon loop report-only, serves every kind of
request, and on SIGTERM repatriates the swap pages stored through the socket into their
backing files, whose maps it saves: the test reads them after the process is gone.
"""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest

from xentmem.control import ControlClient, ControlError, protocol
from xentmem.guestd.swap import read_swap_area

PAGE = 4096


def page(seed: int) -> bytes:
    """A distinct, compressible page per seed."""
    return (f"page-{seed:06d}-".encode() * 400)[:PAGE]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "xentmem.toml"
    path.write_text(
        '[daemon]\nbackend = "auto"\n\n'
        '[backend.zcache]\ncapacity = "64M"\n\n'
        "[selfballoon]\nselfballoon_interval = 7\n"
    )
    return path


def test_start_serve_and_stop_with_nothing_lost(fake_root: Path, config_file: Path,
                                                start_daemon) -> None:
    daemon = start_daemon(fake_root, config_file)
    sock = daemon.socket
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    with ControlClient(sock, timeout=10) as client:
        hello = client.hello()
        assert hello["protocol"] == protocol.PROTOCOL_VERSION
        assert set(hello["ops"]) == set(protocol.OPS)

        status = client.status()
        assert status["state"] == "running"
        assert status["backend"]["name"] == "zcache"
        assert status["backend_choice"]["requested"] == "auto"
        assert "xen" in status["backend_choice"]["reason"]
        assert status["balloon"]["running"] is True
        assert status["balloon"]["report_only"] is True  # no balloon driver in the fake root

        params = {row["name"]: row for row in client.params_list()}
        assert params["capacity"]["value"] == "64M"
        assert params["capacity"]["section"] == "backend"
        assert params["cleancache"]["writable"] is False
        assert params["selfballoon_interval"]["value"] == 7

        # Every knob can be set, and reads back.
        knobs = [name for name, row in params.items() if row["section"] == "selfballoon"]
        assert len(knobs) >= 9
        new_values = {"selfballooning": "0", "frontswap_selfshrinking": "1",
                      "selfballoon_min_usable_mb": "auto", "selfballoon_reserved_mb": "64",
                      "pressure_guard": "1"}
        for name in knobs:
            value = new_values.get(name, "11")
            answer = client.param_set(name, value)
            assert answer["section"] == "selfballoon"
            assert client.param_get(name)["value"] == answer["value"]
        assert client.param_get("selfballoon_interval")["value"] == 11
        # Each writable backend param too; a read-only one is refused and unchanged.
        assert client.param_set("capacity", "32M")["previous"] == "64M"
        assert client.param_set("detailed_stats", True)["value"] is True
        with pytest.raises(ControlError) as refused:
            client.param_set("max_pools", 8)
        assert refused.value.code == protocol.BAD_VALUE
        assert client.param_get("max_pools")["value"] == 1024

        # Unload and load again, with params.
        assert client.unload()["backend"] == "zcache"
        assert client.status()["backend"] is None
        assert client.status()["balloon"]["running"] is False
        loaded = client.load("zcache", {"capacity": "48M", "detailed_stats": 1})
        assert loaded["params"]["capacity"] == "48M"
        assert client.status()["balloon"]["running"] is True

        # The page API: cleancache.
        fs = client.cleancache.init_fs()
        for index in range(8):
            assert client.cleancache.put_page(fs, 42, index, page(index)) is True
        assert client.cleancache.get_page(fs, 42, 3) == page(3)
        assert client.cleancache.get_page(fs, 42, 3) is None  # private ephemeral: exclusive
        client.cleancache.invalidate_page(fs, 42, 4)
        assert client.cleancache.get_page(fs, 42, 4) is None
        handle = bytes(range(8))
        assert client.cleancache.put_page(fs, handle, 0, page(100))
        assert client.cleancache.get_page(fs, handle, 0) == page(100)
        shared = client.cleancache.init_shared_fs("12345678-1234-5678-1234-567812345678")
        assert client.cleancache.put_page(shared, (1, 2, 3), 0, page(200))
        assert client.cleancache.get_page(shared, (1, 2, 3), 0) == page(200)
        client.cleancache.invalidate_inode(fs, 42)
        assert client.cleancache.get_page(fs, 42, 5) is None

        # The page API: frontswap, one file-backed area and one in memory.
        file_type = client.frontswap.init(pages=256, backing="file")
        mem_type = client.frontswap.init(pages=64)
        assert file_type != mem_type
        stored = {}
        for offset in range(40):
            assert client.frontswap.store(file_type, offset, page(1000 + offset)) == 0
            stored[offset] = page(1000 + offset)
        for offset in range(10):
            client.frontswap.store(mem_type, offset, page(2000 + offset))
        client.frontswap.invalidate_page(file_type, 39)
        del stored[39]
        assert client.frontswap.load(file_type, 39) is None
        assert client.frontswap.load(file_type, 5) == page(1005)
        assert client.frontswap.curr_pages() == 49
        assert client.frontswap.shrink(45) == 4  # four oldest pages go to their backing store
        assert client.frontswap.curr_pages() == 45
        assert client.frontswap.load(file_type, 0) == page(1000)  # from the file now

        pools = client.pools()
        assert pools["backend"] == "zcache"
        assert {fs, shared} <= {row["pool_id"] for row in pools["cleancache"]}
        assert {a["type"] for a in pools["frontswap"]["swap_types"]} == {file_type, mem_type}
        assert pools["backend_pools"]

        stats = client.stats()
        assert stats["cleancache"]["puts"] == 10
        assert stats["frontswap"]["succ_stores"] == 50
        assert stats["frontswap"]["repatriated"] == 4
        assert stats["backend"]["pers_pages"] == 45
        assert stats["backend_detailed"]  # detailed_stats=1 at load

        balloon = client.balloon(limit=5)
        assert balloon["available"] is True
        assert balloon["history"] == [] or len(balloon["history"]) <= 5

        metrics = client.metrics()
        assert '# TYPE xentmem_frontend_events_total counter' in metrics
        assert 'xentmem_frontend_events_total{frontend="frontswap",event="succ_stores"} 50' \
            in metrics
        assert 'xentmem_frontswap_tmem_pages{backend="zcache"} 45' in metrics
        assert 'xentmem_backend_loaded{backend="zcache"} 1' in metrics

        # A memory area dies with the daemon: its client turns it off (swapoff) first.
        assert client.frontswap.load(mem_type, 9) == page(2009)
        client.frontswap.invalidate_area(mem_type)

    daemon.send(signal.SIGTERM)
    daemon.notify.wait_for("STOPPING=1")
    code = daemon.stop()
    assert code == 0, daemon.log()

    # Nothing lost: every page stored through the socket is in its backing file afterwards,
    # in the state directory (systemd removes the run directory at stop).
    swap_file = daemon.state_dir / "swap" / f"type-{file_type}.swap"
    assert read_swap_area(swap_file) == stored
    assert not (daemon.run_dir / "swap").exists()
    summary = json.loads((daemon.state_dir / "shutdown.json").read_text())
    assert summary["clean"] is True and summary["errors"] == [] and summary["lost_pages"] == 0
    assert summary["backend"] == "zcache"
    # 35 file pages were still in tmem at SIGTERM (40 stored, 1 freed, 4 shrunk out).
    assert summary["repatriated"] == 35
    areas = {a["type"]: a for a in summary["areas"]}
    assert set(areas) == {file_type}
    assert areas[file_type]["used"] == 39 and areas[file_type]["tmem_pages"] == 0
    assert not daemon.socket.exists()
    log = daemon.log()
    assert "backend zcache chosen (auto)" in log
    assert "shutdown: clean, 35 swap pages repatriated" in log


def test_sd_notify_ready_status_and_stopping(fake_root: Path, start_daemon) -> None:
    daemon = start_daemon(fake_root, None)
    ready = next(m for m in daemon.notify.messages if "READY=1" in m.splitlines())
    assert "STATUS=backend zcache" in ready
    assert f"MAINPID={daemon.proc.pid}" in ready
    daemon.send(signal.SIGTERM)
    daemon.notify.wait_for("STOPPING=1", proc=None)
    assert daemon.stop() == 0


def test_sighup_reloads_and_a_bad_file_keeps_the_old_config(fake_root: Path, config_file: Path,
                                                           start_daemon) -> None:
    daemon = start_daemon(fake_root, config_file)
    with ControlClient(daemon.socket, timeout=10) as client:
        config_file.write_text('[backend.zcache]\ncapacity = "80M"\n\n'
                               "[selfballoon]\nselfballoon_interval = 3\n")
        daemon.send(signal.SIGHUP)
        daemon.notify.wait_for("RELOADING=1", proc=daemon.proc)
        daemon.notify.wait_for("READY=1", proc=daemon.proc)
        assert client.param_get("capacity")["value"] == "80M"
        assert client.param_get("selfballoon_interval")["value"] == 3

        config_file.write_text("[selfballoon]\nselfballoon_interval = 0\n")  # refused: >= 1
        daemon.send(signal.SIGHUP)
        daemon.notify.wait_for("READY=1", proc=daemon.proc)
        assert client.param_get("selfballoon_interval")["value"] == 3
        assert client.param_get("capacity")["value"] == "80M"
        assert client.status()["state"] == "running"
    assert daemon.stop() == 0
    log = daemon.log()
    assert "config reload refused" in log and "selfballoon_interval" in log
    assert f"{config_file}:2" in log


def test_group_socket_mode(fake_root: Path, tmp_path: Path, start_daemon) -> None:
    group = os.getgid()
    config = tmp_path / "xentmem.conf"
    config.write_text(f"options xentmemd control_group={group}\n")
    daemon = start_daemon(fake_root, config)
    info = os.stat(daemon.socket)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == group
    assert daemon.stop() == 0


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.toml", "[selfballoon]\nselfballoon_interval = 5\nfrontswap_inertia = 0\n",
         "bad.toml:3: [selfballoon] frontswap_inertia"),
        ("bad.toml", "[daemon]\nbackend = [\n", "bad.toml: not valid TOML"),
        ("bad.conf", "# comment\noptions zcache capacity=lots\n",
         "bad.conf:2: [zcache] capacity"),
        ("bad.conf", "blacklist zcache\n", "bad.conf:1: 'blacklist'"),
    ],
)
def test_bad_config_refused_at_start(fake_root: Path, tmp_path: Path, start_daemon, name: str,
                                     text: str, expected: str) -> None:
    config = tmp_path / name
    config.write_text(text)
    daemon = start_daemon(fake_root, config, wait=False)
    assert daemon.stop(None) == 78
    assert expected in daemon.log()
    assert not daemon.socket.exists()


def test_missing_explicit_config_is_refused(fake_root: Path, tmp_path: Path,
                                            start_daemon) -> None:
    daemon = start_daemon(fake_root, tmp_path / "absent.toml", wait=False)
    assert daemon.stop(None) == 78
    assert "no such config file" in daemon.log()


def test_journald_format_under_systemd(fake_root: Path, start_daemon) -> None:
    daemon = start_daemon(fake_root, None, env={"INVOCATION_ID": "0123"})
    assert daemon.stop() == 0
    lines = [line for line in daemon.log().splitlines() if line]
    assert lines and all(line.startswith("<") for line in lines), lines[:3]
    assert any(line.startswith("<6>xentmem.guestd: ready") for line in lines)
