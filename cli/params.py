"""``xentmem params``: list, read and write the daemon's params, as one would sysfs knobs.

Three sections share one name space: ``tmem`` (the shim's module flags, read-only once a
backend is loaded, like the kernel's 0444 params), ``backend`` (the loaded backend's params;
the writable ones change at run time) and ``selfballoon`` (the balloon knobs, all writable).
A value is sent as the text a sysfs write would take (``64M``, ``1``, ``auto``); the daemon
parses and checks it, and its refusal is shown as it wrote it.
"""

from __future__ import annotations

from typing import Any

import click
from click.shell_completion import CompletionItem

from xentmem.control.client import ControlClient
from xentmem.control.protocol import ControlError
from xentmem_cli import render
from xentmem_cli.app import App, json_option

SECTIONS = ("tmem", "backend", "selfballoon")
#: ``from``: where the value came from (command line, file:line, kernel command line,
#: default, auto, load request, params set).
LIST_COLUMNS = ("name", "section", "value", "default", "writable", "unit", "from")
#: How long completion may wait for the daemon before offering nothing.
COMPLETION_TIMEOUT_S = 1.0


def complete_param_name(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """Param names from the running daemon; nothing (never an error) if it is not there."""
    root = ctx.find_root()
    socket_path = root.params.get("socket_path")
    try:
        with ControlClient(socket_path, timeout=COMPLETION_TIMEOUT_S) as client:
            records = client.params_list()
    except (ControlError, OSError, ValueError):
        return []
    return [CompletionItem(record["name"], help=str(record.get("doc", "")))
            for record in records
            if isinstance(record, dict) and str(record.get("name", "")).startswith(incomplete)]


def knob_text(value: Any) -> str:
    """A value as its sysfs file would show it: booleans as 1/0, the rest as they are."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return render.scalar(value)


def list_row(record: dict[str, Any]) -> dict[str, str]:
    """One table row; ``value`` is the daemon's ``shown`` text if it sends one (``auto (2410)``)."""
    row = {name: render.scalar(record.get(name)) for name in LIST_COLUMNS}
    row["value"] = str(record["shown"]) if "shown" in record else knob_text(record.get("value"))
    row["default"] = knob_text(record.get("default"))
    row["writable"] = "rw" if record.get("writable") else "ro"
    return row


def list_table(records: list[dict[str, Any]]) -> str:
    return render.table([list_row(record) for record in records], LIST_COLUMNS)


@click.group()
def params() -> None:
    """List, read and set params: tmem flags, the backend's params, the selfballoon knobs."""


@params.command("list")
@click.option("--section", type=click.Choice(SECTIONS),
              help="Only the params of this section.")
@click.option("--writable", "writable_only", is_flag=True,
              help="Only the params that can be set now.")
@json_option
@click.pass_obj
def list_params(app: App, *, section: str | None, writable_only: bool, as_json: bool) -> None:
    """List every param with its value, default and whether it can be set now."""
    records: list[dict[str, Any]] = app.call("params.list")
    chosen = [record for record in records
              if (section is None or record.get("section") == section)
              and (not writable_only or record.get("writable"))]
    app.emit(chosen, as_json=as_json, render=list_table)


@params.command("get")
@click.argument("name", shell_complete=complete_param_name)
@json_option
@click.pass_obj
def get_param(app: App, *, name: str, as_json: bool) -> None:
    """Show one param: value, default, accepted values and what it does."""
    record = app.call("params.get", name=name)
    app.emit(record, as_json=as_json, render=render.tree)


def set_line(result: dict[str, Any]) -> str:
    """``name = value (was previous)``, spelt as ``params list`` shows them (``auto``)."""
    value = result["shown"] if "shown" in result else knob_text(result.get("value"))
    previous = (result["previous_shown"] if "previous_shown" in result
                else knob_text(result.get("previous")))
    return f"{result.get('name')} = {value} (was {previous})"


#: A VALUE such as ``-5`` is a value, not an option: the daemon's range check refuses it.
@params.command("set", context_settings={"ignore_unknown_options": True})
@click.argument("name", shell_complete=complete_param_name)
@click.argument("value")
@json_option
@click.pass_obj
def set_param(app: App, *, name: str, value: str, as_json: bool) -> None:
    """Set a writable param to VALUE, given as a sysfs write takes it (64M, 1, auto).

    A refused value changes nothing; the daemon says what it accepts.
    """
    result = app.call("params.set", name=name, value=value)
    app.emit(result, as_json=as_json, render=set_line)
