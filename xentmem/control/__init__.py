"""The control interface of ``xentmemd``: the wire protocol and a client for other programs."""

from __future__ import annotations

from xentmem.control.client import ControlClient, default_socket_path
from xentmem.control.protocol import PROTOCOL_VERSION, ControlError

__all__ = ["PROTOCOL_VERSION", "ControlClient", "ControlError", "default_socket_path"]
