"""Request ids and log lines, as a hostile client would probe them: an id that gRPC cannot carry in
the `x-request-id` trailer, or that would break a log line, is refused with INVALID_ARGUMENT naming
`request_id` (never INTERNAL), under an id of the server's; what the log line and the metric record
is what the client got; a log line stays one line whatever a request puts in it."""

from __future__ import annotations

import io
import json
import logging
import re
import sys
from typing import Any

import grpc
import pytest

from seqserve.proto import seqserve_pb2 as pb
from seqserve.server.logs import JsonFormatter, TextFormatter

TIMEOUT = 30.0
SAFE_ID = re.compile(r"[\x21-\x7e]{1,128}")
BAD_IDS = {"non-ascii": "é", "newline": "a\nb", "too long": "x" * 129, "space": "a b", "nul": "a\x00b",
           "forged log line": "x\n2026-01-01 00:00:00,000 INFO seqserve.requests: Generate admin OK"}


def requests_counted(server: Any, method: str, code: str) -> float:
    value = server.server.metrics.registry.get_sample_value("seqserve_requests_total", {"method": method, "code": code})
    return value or 0.0


@pytest.mark.parametrize("text", ["1 May 2000", ""], ids=["good input", "empty input"])
@pytest.mark.parametrize("bad_id", list(BAD_IDS.values()), ids=list(BAD_IDS))
def test_bad_request_id_is_invalid_argument_under_a_safe_id(server: Any, caplog: pytest.LogCaptureFixture,
                                                            bad_id: str, text: str) -> None:
    calls = {"Generate": lambda: server.stub.Generate(pb.GenerateRequest(inputs=[text], request_id=bad_id),
                                                      timeout=TIMEOUT),
             "GenerateStream": lambda: list(server.stub.GenerateStream(
                 pb.GenerateStreamRequest(input=text, request_id=bad_id), timeout=TIMEOUT))}
    for method, call in calls.items():
        before = {code: requests_counted(server, method, code) for code in ("INVALID_ARGUMENT", "INTERNAL", "OK")}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="seqserve.requests"), pytest.raises(grpc.RpcError) as info:
            call()
        error = info.value
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error.code(), error.details())
        assert error.details().startswith("request_id: ") and "printable ASCII" in error.details()
        trailer = dict(error.trailing_metadata() or ())
        assert SAFE_ID.fullmatch(trailer["x-request-id"]) and trailer["x-request-id"] != bad_id
        # The log line and the metric record the status the client got, under the same safe id.
        [record] = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("method") == method]
        assert record["status"] == "INVALID_ARGUMENT" and record["request_id"] == trailer["x-request-id"]
        assert {code: requests_counted(server, method, code) - n for code, n in before.items()} == \
            {"INVALID_ARGUMENT": 1, "INTERNAL": 0, "OK": 0}
    # The server goes on: a normal call, with an id of its caller's, afterwards.
    response = server.stub.Generate(pb.GenerateRequest(inputs=["1 May 2000"], request_id="after-bad.id_1"),
                                    timeout=TIMEOUT)
    assert response.request_id == "after-bad.id_1" and response.results[0].sequences[0].token_ids


def test_every_printable_ascii_id_up_to_the_limit_is_echoed(server: Any) -> None:
    printable = "".join(chr(c) for c in range(0x21, 0x7F))  # 94 characters
    for request_id in (printable, "i" * 128, "7"):
        response = server.stub.Generate(pb.GenerateRequest(inputs=["1 May 2000"], request_id=request_id),
                                        timeout=TIMEOUT)
        assert response.request_id == request_id
        last = list(server.stub.GenerateStream(pb.GenerateStreamRequest(input="1 May 2000", request_id=request_id),
                                               timeout=TIMEOUT))[-1]
        assert last.request_id == request_id
    # An error echoes a good id in the trailer.
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Generate(pb.GenerateRequest(inputs=[""], request_id=printable), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.value.trailing_metadata())["x-request-id"] == printable


def _record(message: str, *args: object, fields: dict[str, Any], exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("bad\nthing")
        except RuntimeError:
            exc_info = sys.exc_info()
    record = logging.LogRecord("seqserve.requests", logging.INFO, __file__, 1, message, args, exc_info)
    record.fields = fields
    return record


FORGED = "x\n2026-01-01 00:00:00,000 INFO seqserve.requests: Generate admin OK event=request"


def test_text_log_line_is_one_line_whatever_its_message_and_fields_hold() -> None:
    record = _record("request %s failed\r\n%s", FORGED, "tab\there \u2028 \x85 \x1b[31m",
                     fields={"request_id": FORGED, "error": 'inputs[0]: "quoted" = \\n', "empty": "", "n": 3,
                             "peer": "ipv4:127.0.0.1:5000"}, exc=True)
    line = TextFormatter().format(record)
    assert len(line.splitlines()) == 1 and "\n" not in line and "\r" not in line, line
    assert line.isprintable(), line
    assert " INFO seqserve.requests: request x\\n2026-01-01 00:00:00,000 INFO " in line
    assert " request_id=\"x\\n2026-01-01 " in line and " empty=\"\" n=3 peer=ipv4:127.0.0.1:5000" in line
    assert ' error="inputs[0]: \\"quoted\\" = \\\\n"' in line  # a backslash in the text is doubled
    assert " exception=\"Traceback (most recent call last):\\n" in line and "RuntimeError: bad\\nthing" in line
    # Plain values stay readable.
    plain = TextFormatter().format(_record("Generate %s OK", "id-1", fields={"request_id": "id-1", "status": "OK"}))
    assert plain.endswith(" INFO seqserve.requests: Generate id-1 OK request_id=id-1 status=OK")


def test_json_log_line_is_one_line_whatever_its_message_and_fields_hold() -> None:
    record = _record("request %s failed \u2028 \x85 \u2029", FORGED, fields={"request_id": FORGED}, exc=True)
    line = JsonFormatter().format(record)
    assert len(line.splitlines()) == 1 and len(io.StringIO(line).readlines()) == 1, line
    decoded = json.loads(line)
    assert decoded["message"] == f"request {FORGED} failed \u2028 \x85 \u2029" and decoded["request_id"] == FORGED
    assert "RuntimeError: bad\nthing" in decoded["exception"]
