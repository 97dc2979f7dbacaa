"""``python -m xentmem.mock_xenstored --dir DIR [--domain N ...]``: run the stand-in by hand."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from xentmem.mock_xenstored.server import XsServer
from xentmem.mock_xenstored.store import Limits

log = logging.getLogger("xentmem.mock_xenstored")


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT or SIGTERM; print the sockets made."""
    parser = argparse.ArgumentParser(
        prog="python -m xentmem.mock_xenstored",
        description="A xenstore server on Unix sockets: dom0 on DIR/socket, guest N on "
        "DIR/domain-N.sock once introduced.",
    )
    parser.add_argument("--dir", required=True, type=Path, help="where the sockets go")
    parser.add_argument(
        "--domain",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="create guest N's home as a toolstack would and introduce it (repeatable)",
    )
    parser.add_argument(
        "--flavour",
        choices=["c-xenstored", "oxenstored"],
        default="c-xenstored",
        help="whose limits to apply (default: %(default)s)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log every fault and debug line"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    limits = Limits.oxenstored() if args.flavour == "oxenstored" else Limits.c_xenstored()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with XsServer(args.dir, limits=limits) as server:
        print(f"XENSTORED_PATH={server.dom0_socket}", flush=True)
        for domid in args.domain:
            path = server.prepare_domain(domid)
            print(f"DOMAIN_{domid}_SOCKET={path}", flush=True)
        while not stop.wait(1.0):
            if not server.running:
                log.error("the server loop stopped")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
