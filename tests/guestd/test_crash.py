"""SIGKILL at random instants while a client stores to a file-backed swap area: every
acknowledged page is then read back intact, offline from the file and through a restarted
daemon that re-attached the area; the page in flight at the kill is its old or its new
version, never anything else.  A seeded RNG picks the instants (after how many
acknowledged operations the kill lands), so a failure replays."""

from __future__ import annotations

import json
import random
import signal
import threading
from pathlib import Path
from typing import Any

from xentmem.control import ControlClient, ControlError
from xentmem.guestd.swap import read_swap_area

SEED = 20261203
ROUNDS = 5
PAGES = 48
#: Every stored page is in the file as well as in tmem: what a killed daemon leaves is the
#: file (zcache's tmem is the daemon's own memory and dies with it).
WRITETHROUGH = ("-o", "tmem.frontswap_writethrough=1", "-o", "tmem.selfballooning_at_load=0",
                "-o", "tmem.selfshrinking=0")


def page_of(round_: int, seq: int) -> bytes:
    return (round_.to_bytes(2, "little") + seq.to_bytes(6, "little")) * 512


class Writer:
    """Stores and frees pages until the daemon dies; knows what was acknowledged."""

    def __init__(self, socket: Path, swap_type: int, round_: int, rng: random.Random,
                 acked: dict[int, bytes | None]) -> None:
        self.socket, self.swap_type, self.round, self.rng = socket, swap_type, round_, rng
        self.acked = acked
        self.in_flight: tuple[int, bytes | None] | None = None
        self.count = 0
        self.progress = threading.Condition()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with ControlClient(self.socket, timeout=10) as client:
                seq = 0
                while True:
                    offset = self.rng.randrange(PAGES)
                    data = None if self.rng.random() < 0.1 else page_of(self.round, seq)
                    seq += 1
                    self.in_flight = (offset, data)
                    if data is None:
                        client.frontswap.invalidate_page(self.swap_type, offset)
                    else:
                        assert client.frontswap.store(self.swap_type, offset, data) == -1
                    with self.progress:
                        self.acked[offset] = data
                        self.in_flight = None
                        self.count += 1
                        self.progress.notify_all()
        except (ControlError, OSError):  # the daemon was killed under it
            pass
        except BaseException as exc:
            self.error = exc
        finally:
            with self.progress:
                self.count = -1
                self.progress.notify_all()

    def wait_for(self, count: int) -> None:
        with self.progress:
            assert self.progress.wait_for(lambda: self.count >= count or self.count < 0, 20.0)


def check_area(found: dict[int, bytes], acked: dict[int, bytes | None],
               in_flight: tuple[int, bytes | None] | None, where: str) -> None:
    for offset in range(PAGES):
        allowed = [acked.get(offset)]
        if in_flight is not None and in_flight[0] == offset:
            allowed.append(in_flight[1])
        assert found.get(offset) in allowed, f"{where}: slot {offset} holds a page never stored"


def test_sigkill_while_storing_loses_no_acknowledged_page(tmp_path: Path, fake_root: Path,
                                                          start_daemon: Any) -> None:
    rng = random.Random(SEED)
    acked: dict[int, bytes | None] = {}
    in_flight: tuple[int, bytes | None] | None = None
    state = tmp_path / "state"
    swap_file = state / "swap" / "type-0.swap"
    args = (*WRITETHROUGH, "--state-dir", str(state))
    for round_ in range(ROUNDS):
        daemon = start_daemon(fake_root, None, *args, base=tmp_path / f"round-{round_}")
        with ControlClient(daemon.socket, timeout=10) as client:
            if round_ == 0:
                assert client.frontswap.init(PAGES, "file") == 0
            else:  # re-attached at start, every acknowledged page readable
                loaded = {o: client.frontswap.load(0, o) for o in range(PAGES)}
                check_area({o: p for o, p in loaded.items() if p is not None}, acked,
                           in_flight, f"restarted daemon, round {round_}")
                acked = {o: p for o, p in loaded.items() if p is not None}
        writer = Writer(daemon.socket, 0, round_, random.Random(rng.random()), acked)
        thread = threading.Thread(target=writer.run)
        thread.start()
        writer.wait_for(rng.randrange(5, 120))
        daemon.send(signal.SIGKILL)
        assert daemon.stop(None) == -signal.SIGKILL
        thread.join(20.0)
        assert writer.error is None, writer.error
        in_flight = writer.in_flight
        check_area(read_swap_area(swap_file), acked, in_flight, f"offline, round {round_}")
        record = json.loads((state / "shutdown.json").read_text())
        assert record["state"] == "running" and record["clean"] is False  # what a kill leaves

    daemon = start_daemon(fake_root, None, *args, base=tmp_path / "last")
    with ControlClient(daemon.socket, timeout=10) as client:
        loaded = {o: client.frontswap.load(0, o) for o in range(PAGES)}
    check_area({o: p for o, p in loaded.items() if p is not None}, acked, in_flight, "last")
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log()
    record = json.loads((state / "shutdown.json").read_text())
    assert record["clean"] is True and record["lost_pages"] == 0
    assert [r["state"] for r in record["previous"]] == ["crashed"] * ROUNDS
