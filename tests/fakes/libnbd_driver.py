"""Run by Debian's /usr/bin/python3 (which has python3-libnbd), never imported by the suite.

Reads one JSON request per line on stdin, answers one JSON line on stdout:
``{"new": true}`` -> ``{"ok": H}`` a new handle; ``{"h": H, "m": "pread", "a": [...]}`` calls a
libnbd method; ``{"close": H}`` closes a handle.  Bytes travel as ``{"b64": ...}``; a libnbd
error comes back as ``{"error": {"errno": "EINVAL", "msg": ...}}``.
"""

import base64
import json
import sys

import nbd


def decode(value):
    if isinstance(value, dict) and "b64" in value:
        return base64.b64decode(value["b64"])
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


def encode(value):
    if isinstance(value, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def main():
    handles = {}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request.get("new"):
                handle = nbd.NBD()
                number = max(handles, default=0) + 1
                handles[number] = handle
                result = number
            elif "close" in request:
                handle = handles.pop(request["close"])
                getattr(handle, "close", lambda: None)()  # older libnbd: freed when dropped
                del handle
                result = None
            elif request.get("m") == "opt_list":  # its callback collects the names
                names = []
                count = handles[request["h"]].opt_list(
                    lambda name, description, into=names: into.append(name) or 0)
                result = {"count": count, "names": names}
            else:
                handle = handles[request["h"]]
                args = decode(request.get("a", []))
                result = getattr(handle, request["m"])(*args)
            answer = {"ok": encode(result)}
        except nbd.Error as exc:
            answer = {"error": {"errno": exc.errnum and exc.errno, "msg": exc.string}}
        except Exception as exc:  # the test reads it
            answer = {"error": {"errno": None, "msg": f"{type(exc).__name__}: {exc}"}}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
