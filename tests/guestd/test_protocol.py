"""The wire protocol: request checking against the op table, responses, keys and pages."""

from __future__ import annotations

import base64
import json

import pytest

from xentmem.control import protocol
from xentmem.control.protocol import ControlError, decode_request, decode_response


def line(**message: object) -> bytes:
    return json.dumps(message).encode() + b"\n"


def refused(raw: bytes) -> ControlError:
    with pytest.raises(ControlError) as caught:
        decode_request(raw)
    return caught.value


def test_a_good_request_round_trips() -> None:
    raw = protocol.encode_request("params.set", {"name": "capacity", "value": "64M"}, 7)
    request = decode_request(raw)
    assert request.op == "params.set"
    assert dict(request.args) == {"name": "capacity", "value": "64M"}
    assert request.id == 7


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"not json\n", protocol.BAD_REQUEST),
        (b"[1, 2]\n", protocol.BAD_REQUEST),
        (b"\xff\xfe\n", protocol.BAD_REQUEST),
        (line(v=1, op="status", extra=1), protocol.BAD_REQUEST),
        (line(v=1, op="status", id=[1]), protocol.BAD_REQUEST),
        (line(v=1, op="status", id=True), protocol.BAD_REQUEST),
        (line(v=2, op="status"), protocol.UNSUPPORTED_VERSION),
        (line(v=True, op="status"), protocol.UNSUPPORTED_VERSION),
        (line(v=1.0, op="status"), protocol.UNSUPPORTED_VERSION),
        (line(op="status"), protocol.UNSUPPORTED_VERSION),
        (line(v=1, op=5), protocol.BAD_REQUEST),
        (line(v=1, op="reboot"), protocol.UNKNOWN_OP),
        (line(v=1, op="status", args=[]), protocol.BAD_ARGS),
        (line(v=1, op="status", args={"x": 1}), protocol.BAD_ARGS),
        (line(v=1, op="params.get", args={}), protocol.BAD_ARGS),
        (line(v=1, op="params.get", args={"name": 3}), protocol.BAD_ARGS),
        (line(v=1, op="params.set", args={"name": "a", "value": [1]}), protocol.BAD_ARGS),
        (line(v=1, op="frontswap.load", args={"type": 0, "offset": -1}), protocol.BAD_ARGS),
        (line(v=1, op="frontswap.load", args={"type": True, "offset": 0}), protocol.BAD_ARGS),
        (line(v=1, op="frontswap.store", args={"type": 0, "offset": 0, "data": "!!"}),
         protocol.BAD_ARGS),
        (line(v=1, op="cleancache.get_page", args={"pool_id": 1, "key": "x", "index": 0}),
         protocol.BAD_ARGS),
        (line(v=1, op="cleancache.get_page",
              args={"pool_id": 1, "key": {"oid": [1, 2]}, "index": 0}), protocol.BAD_ARGS),
        (line(v=1, op="backend.load", args={"name": "zcache", "params": "capacity=1M"}),
         protocol.BAD_ARGS),
    ],
)
def test_bad_requests_are_refused_with_a_code(raw: bytes, code: str) -> None:
    assert refused(raw).code == code


def test_too_long_request() -> None:
    raw = b'{"v":1,"op":"status","id":"' + b"x" * protocol.MAX_REQUEST_BYTES + b'"}\n'
    assert refused(raw).code == protocol.BAD_REQUEST


def test_the_id_of_a_refused_line_is_echoed_when_it_can_be_read() -> None:
    assert protocol.request_id_of(line(v=9, op="status", id="abc")) == "abc"
    assert protocol.request_id_of(b"garbage") is None
    assert protocol.request_id_of(line(v=1, id={"no": 1})) is None


def test_pages_and_keys_are_decoded() -> None:
    data = bytes(range(256)) * 16
    request = decode_request(line(v=1, op="cleancache.put_page", args={
        "pool_id": 1000, "key": {"handle": base64.b64encode(b"abcd").decode()}, "index": 3,
        "data": base64.b64encode(data).decode()}))
    assert request.args["data"] == data
    assert request.args["key"] == b"abcd"
    oid = decode_request(line(v=1, op="cleancache.invalidate_inode",
                              args={"pool_id": 1000, "key": {"oid": [1, 2, 3]}}))
    assert oid.args["key"] == (1, 2, 3)
    for key in (42, b"\x01\x02\x03\x04", (7, 8, 9)):
        assert protocol.decode_file_key(json.loads(json.dumps(
            protocol.encode_file_key(key)))) == key
    with pytest.raises(TypeError):
        protocol.encode_file_key(True)


def test_every_op_has_a_documented_shape() -> None:
    for spec in protocol.OPS.values():
        assert spec.doc and spec.returns, spec.name
        for arg in spec.args:
            assert arg.kind in protocol.ARG_KINDS
    doc = (__import__("pathlib").Path(__file__).parents[2] / "docs" / "control-protocol.md"
           ).read_text()
    for name in protocol.OPS:
        assert f"`{name}`" in doc, name
    for code in protocol.ERROR_CODES:
        assert f"`{code}`" in doc, code


def test_responses() -> None:
    ok = protocol.encode_result(3, {"a": 1})
    assert decode_response(ok, 3) == {"a": 1}
    error = protocol.encode_error(3, ControlError(protocol.BAD_VALUE, "no"))
    with pytest.raises(ControlError) as caught:
        decode_response(error, 3)
    assert (caught.value.code, caught.value.message) == (protocol.BAD_VALUE, "no")
    for garbage, expected_id in ((b"nope", 1), (b'{"v":2,"ok":true}', 1), (ok, 4),
                                 (b'{"v":1,"id":1,"ok":false}', 1)):
        with pytest.raises(ControlError) as caught:
            decode_response(garbage, expected_id)
        assert caught.value.code == protocol.PROTOCOL


@pytest.mark.parametrize("depth", [protocol.MAX_REQUEST_DEPTH + 1, 1_000, 30_000])
def test_deep_nesting_is_a_bad_request_not_a_crash(depth: int) -> None:
    # Regression: json.loads hit RecursionError on a line nested 1,000 deep, which no
    # handler caught.  The id is still read when the nesting is inside the args.
    deep = b'{"v":1,"id":5,"op":"status","args":{"x":' + b"[" * depth + b"]" * depth + b"}}"
    error = refused(deep)
    assert error.code == protocol.BAD_REQUEST and "nested" in error.message
    assert protocol.request_id_of(deep) is None  # too deep to look inside, even for the id
    assert refused(b"[" * depth).code == protocol.BAD_REQUEST


def test_nesting_inside_strings_does_not_count() -> None:
    text = '[' * 100 + '\\"{' * 100
    request = decode_request(line(v=1, op="params.get", args={"name": text}))
    assert request.args["name"] == text


def test_a_deeply_nested_answer_is_a_protocol_error() -> None:
    with pytest.raises(ControlError) as caught:
        decode_response(b'{"v":1,"id":1,"ok":true,"result":' + b"[" * 100_000 + b"}")
    assert caught.value.code == protocol.PROTOCOL
