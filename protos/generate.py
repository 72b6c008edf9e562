"""Generates the Python stubs of protos/judgeserve.proto: judgeserve_pb2.py, .pyi and _pb2_grpc.py.

  python protos/generate.py              rewrites the stubs next to the .proto (commit them)
  python protos/generate.py --out DIR    writes them under DIR/protos/ instead (tests compare the two)

The .proto is passed to protoc under the virtual path `protos/judgeserve.proto` (`-Iprotos=<folder>`), so
the generated gRPC module imports `from protos import judgeserve_pb2`, which works with the repository
root on sys.path, and no hand edit of the output is needed. Not for: anything at run time (the server and
client import the committed stubs; grpcio-tools is a test/dev dependency only).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("judgeserve.proto",)
OUTPUTS = ("judgeserve_pb2.py", "judgeserve_pb2.pyi", "judgeserve_pb2_grpc.py")


def generate(out_root: Path) -> list[Path]:
    """Runs grpc_tools.protoc; the stubs land in out_root/protos/. Returns their paths."""
    out_root = Path(out_root)
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-Iprotos={PROTO_DIR}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(PROTO_DIR / name) for name in PROTO_FILES),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"protoc failed ({done.returncode}):\n{done.stderr}")
    return [out_root / "protos" / name for name in OUTPUTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROTO_DIR.parent, help="root folder; stubs go to OUT/protos/")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
