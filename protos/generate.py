"""Generates the Python stubs of the `.proto` files beside this module: `python -m protos.generate`.

`--out DIR` writes them elsewhere (the test that proves the committed stubs are current uses it).
"""

import argparse
import pathlib
import sys

from grpc_tools import protoc

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
PROTO_FILES = sorted(p.name for p in PACKAGE_DIR.glob("*.proto"))


def generate(out_root: pathlib.Path) -> list[pathlib.Path]:
    """Writes `protos/<name>_pb2.py` and `protos/<name>_pb2_grpc.py` under `out_root`."""
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    args = ["grpc_tools.protoc", f"-I{PACKAGE_DIR.parent}", f"--python_out={out_root}",
            f"--grpc_python_out={out_root}", *(f"protos/{name}" for name in PROTO_FILES)]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO_FILES}")
    stems = [name.removesuffix(".proto") for name in PROTO_FILES]
    return [out_root / "protos" / f"{s}{suffix}" for s in stems for suffix in ("_pb2.py", "_pb2_grpc.py")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=PACKAGE_DIR.parent,
                        help="root under which protos/*_pb2*.py are written (default: the source tree)")
    for path in generate(parser.parse_args().out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
