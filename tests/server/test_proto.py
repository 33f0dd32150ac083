"""The proto contract: generated code is fresh, imports under the `seqserve.proto` namespace, and the
.proto follows the house rules (a comment on every field, enum zero values *_UNSPECIFIED)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import seqserve.proto
from seqserve.proto import generate
from seqserve.proto import seqserve_pb2 as pb

PROTO_DIR = Path(seqserve.proto.__file__).parent


def test_generated_code_is_not_stale(tmp_path: Path) -> None:
    for fresh in generate.generate(tmp_path):
        committed = PROTO_DIR / fresh.name
        assert committed.is_file(), f"{committed} is missing: run `make proto`"
        assert committed.read_bytes() == fresh.read_bytes(), \
            f"{committed.name} is stale (or hand-edited): run `make proto` and commit the result"


def test_generated_code_imports_under_the_namespace() -> None:
    code = ("import sys; from seqserve.proto import seqserve_pb2_grpc; "
            "assert 'proto' not in sys.modules and 'seqserve_pb2' not in sys.modules; "
            "assert seqserve_pb2_grpc.seqserve_dot_proto_dot_seqserve__pb2 is sys.modules['seqserve.proto.seqserve_pb2']")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert pb.DESCRIPTOR.package == "seqserve.v1" and pb.DESCRIPTOR.name == "seqserve/proto/seqserve.proto"


def test_proto_file_ships_with_the_package() -> None:
    assert (PROTO_DIR / "seqserve.proto").is_file()


def test_every_field_and_enum_value_has_a_comment() -> None:
    lines = (PROTO_DIR / "seqserve.proto").read_text().splitlines()
    declaration = re.compile(r"^\s*(optional |repeated )?[\w.]+ \w+ = \d+;|^\s*[A-Z_0-9]+ = \d+;")
    for number, line in enumerate(lines):
        if declaration.match(line):
            assert lines[number - 1].strip().startswith("//"), f"line {number + 1} has no comment: {line.strip()}"


def test_enum_zero_values_are_unspecified() -> None:
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values_by_number[0].name == f"{re.sub(r'(?<!^)(?=[A-Z])', '_', enum.name).upper()}_UNSPECIFIED"


def test_one_request_and_response_pair_per_rpc() -> None:
    service = pb.DESCRIPTOR.services_by_name["SeqServe"]
    assert service.full_name == "seqserve.v1.SeqServe"
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"
