"""Generate the Python code of `seqserve.proto` with grpcio-tools: `make proto`.

The .proto is compiled under the virtual path `seqserve/proto/`, so the generated modules import
each other as `seqserve.proto.seqserve_pb2` (the installed name, not a top-level `proto`), and the
descriptor that reflection hands out is named `seqserve/proto/seqserve.proto`.

grpcio-tools (the `dev` extra) is pinned exactly in pyproject.toml: the generated files embed its
version, and the staleness test compares them byte for byte. Bump the pin and rerun this together.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILE = "seqserve.proto"
VIRTUAL_DIR = "seqserve/proto"  # the import path the generated code sees
GENERATED = ("seqserve_pb2.py", "seqserve_pb2.pyi", "seqserve_pb2_grpc.py")


def generate(out_dir: str | Path = PROTO_DIR) -> list[Path]:
    """Compile the .proto into `out_dir`; returns the files written (`GENERATED`, in order)."""
    from grpc_tools import protoc  # dev-only: the server itself never needs the compiler

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["grpc_tools.protoc", f"-I{VIRTUAL_DIR}={PROTO_DIR}",
                f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}",
                f"{VIRTUAL_DIR}/{PROTO_FILE}"]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {PROTO_DIR / PROTO_FILE} (its message is above)")
        written = []
        for name in GENERATED:
            target = out_dir / name
            shutil.copyfile(Path(tmp, VIRTUAL_DIR, name), target)
            written.append(target)
    return written


def main() -> int:
    for path in generate():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
