"""Generates the Python gRPC code for rill.v1 from proto/rill/v1/*.proto into gen/.

Run it once after installing requirements.txt, and again whenever the .proto files change:

    python generate.py

The output (gen/rill/v1/*_pb2.py, *_pb2_grpc.py and *.pyi stubs) is not committed: the
.proto files are the contract, and the code is always generated from them.
"""

import pathlib
import shutil
import sys

from grpc_tools import protoc

HERE = pathlib.Path(__file__).resolve().parent
PROTO_ROOT = HERE.parent.parent / "proto"
OUT = HERE / "gen"


def main() -> int:
    protos = sorted(PROTO_ROOT.glob("rill/v1/*.proto"))
    if not protos:
        print(f"generate.py: no .proto files under {PROTO_ROOT}/rill/v1", file=sys.stderr)
        return 1
    # Start clean, so a .proto that was removed leaves no stale module behind.
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--python_out={OUT}",
        f"--pyi_out={OUT}",
        f"--grpc_python_out={OUT}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"generate.py: protoc failed with exit code {code}", file=sys.stderr)
        return code
    print(f"generated {len(protos)} files' code into {OUT.relative_to(HERE)}/rill/v1/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
