"""``xentmem``: the command line of xentmemd.

The root group reads the two global options and puts an :class:`~xentmem_cli.app.App` in
``ctx.obj``; each command family lives in its own module and is added here.  ``main()`` is the
console script (``xentmem = "xentmem_cli.main:main"``); shell completion comes from click::

    eval "$(_XENTMEM_COMPLETE=bash_source xentmem)"      # or zsh_source / fish_source
"""

from __future__ import annotations

from typing import Any

import click

from xentmem.console import CONTEXT_SETTINGS, Seconds
from xentmem.control.protocol import DEFAULT_SOCKET_PATH
from xentmem_cli import backend, balloon, metrics, params, pools, run, stats, status, swap
from xentmem_cli.app import App


@click.group(name="xentmem", context_settings=CONTEXT_SETTINGS)
@click.option(
    "--socket", "socket_path", envvar="XENTMEM_SOCKET", default=DEFAULT_SOCKET_PATH,
    show_default=True, show_envvar=True, metavar="PATH",
    type=click.Path(dir_okay=False, readable=False),
    help="The daemon's control socket (`xentmem run` prints the one it uses).",
)
@click.option(
    "--timeout", envvar="XENTMEM_TIMEOUT", default=10.0, show_default=True, show_envvar=True,
    type=Seconds(min=0.0, min_open=True), metavar="SECONDS",
    help="How long to wait for the daemon's answer (load and unload: 300 s unless given).",
)
@click.version_option(package_name="xentmem", prog_name="xentmem")
@click.pass_context
def cli(ctx: click.Context, *, socket_path: str, timeout: float) -> None:
    """Transcendent memory (cleancache, frontswap) and self-ballooning for a Xen guest.

    New here?  `xentmem run` starts the daemon in this terminal (on the local zcache store when
    there is no Xen) and prints what to type in a second one.  Read commands take --json.
    """
    source = ctx.get_parameter_source("timeout")
    app = App(socket_path, timeout,
              timeout_given=source not in (None, click.core.ParameterSource.DEFAULT))
    ctx.obj = app
    ctx.call_on_close(app.close)


for command in (
    status.status,
    params.params,
    backend.backends,
    backend.load,
    backend.unload,
    backend.reload,
    pools.pools,
    stats.stats,
    balloon.balloon,
    metrics.metrics,
    swap.swap,
    run.run,
):
    cli.add_command(command)


def main(argv: list[str] | None = None, **extra: Any) -> Any:
    """The console script.  ``prog_name`` is fixed so completion uses ``_XENTMEM_COMPLETE``."""
    return cli.main(args=argv, prog_name="xentmem", **extra)
