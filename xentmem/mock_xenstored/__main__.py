"""``python -m xentmem.mock_xenstored --dir DIR [--domain N ...]``: run the stand-in by hand.

It prints ``XENSTORED_PATH=...`` (dom0's socket) and ``DOMAIN_N_SOCKET=...`` for each guest,
then serves until SIGINT or SIGTERM.  Output and exit codes follow :mod:`xentmem.console`.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

import click

from xentmem.console import CONTEXT_SETTINGS, abort
from xentmem.mock_xenstored.server import XsServer
from xentmem.mock_xenstored.store import Limits

log = logging.getLogger("xentmem.mock_xenstored")


@click.command(name="xentmem.mock_xenstored", context_settings=CONTEXT_SETTINGS)
@click.option("--dir", "directory", required=True, metavar="DIR",
              type=click.Path(file_okay=False, path_type=Path), help="Where the sockets go.")
@click.option("--domain", "domains", type=click.IntRange(1, 0x7FEF), multiple=True,
              metavar="N",
              help="Create guest N's home as a toolstack would and introduce it (repeatable).")
@click.option("--flavour", type=click.Choice(["c-xenstored", "oxenstored"]),
              default="c-xenstored", show_default=True, help="Whose limits to apply.")
@click.option("-v", "--verbose", is_flag=True, help="Log every fault and debug line.")
def command(directory: Path, domains: tuple[int, ...], flavour: str, verbose: bool) -> None:
    """A xenstore server on Unix sockets: dom0 on DIR/socket, guest N on DIR/domain-N.sock
    once introduced."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    limits = Limits.oxenstored() if flavour == "oxenstored" else Limits.c_xenstored()
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with XsServer(directory, limits=limits) as server:
        click.echo(f"XENSTORED_PATH={server.dom0_socket}")
        sys.stdout.flush()
        for domid in domains:
            path = server.prepare_domain(domid)
            click.echo(f"DOMAIN_{domid}_SOCKET={path}")
            sys.stdout.flush()
        while not stop.wait(1.0):
            if not server.running:
                abort("the server loop stopped")


def main(argv: Sequence[str] | None = None) -> None:
    """Serve until SIGINT or SIGTERM (exits 0), or fail with one line on stderr."""
    command.main(args=None if argv is None else list(argv),
                 prog_name="python -m xentmem.mock_xenstored")


if __name__ == "__main__":
    main()
