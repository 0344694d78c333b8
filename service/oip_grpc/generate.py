"""Regenerate the checked-in protobuf module from `third_party/grpc_predict_v2.proto` (developers only).

    /path/to/venv-with-grpcio-tools/bin/python -m service.oip_grpc.generate

Why checked in rather than generated at build: the service image installs only the base
dependencies, and grpcio-tools (a compiler, ~10 MB) has no place there; a build-time step would
also make the wheel depend on which protoc the builder happened to have.

Which protoc: protobuf's Python runtime refuses gencode *newer* than itself (runtime_version.py),
so the module is generated with the oldest protoc of the protobuf line pyproject.toml allows
(`protobuf>=6.31.1`): grpcio-tools 1.75.1 bundles protoc 31.1 = gencode 6.31.1, which every
runtime from 6.31.1 on (7.x included) loads. Use exactly that grpcio-tools, in a throwaway venv:

    python3 -m venv /tmp/protogen && /tmp/protogen/bin/pip install grpcio-tools==1.75.1
    /tmp/protogen/bin/python -m service.oip_grpc.generate

One edit after protoc: the file descriptor goes into a *private* descriptor pool, not protobuf's
default one. Triton's client (tritonclient.grpc) registers messages with the same full names
(`inference.ModelInferRequest`, ...) from its own grpc_service.proto; two different files defining
one symbol in the default pool fail at import ("duplicate symbol"), so a process could not hold
both (a test importing the service and tritonclient, an application embedding both). Message names
never travel on the wire, so a private pool changes nothing for clients.

tests/service/test_grpc_codegen.py checks that the checked-in module describes exactly the .proto
(when grpcio-tools is importable) and that the gencode version is the one named here.
"""

from __future__ import annotations

import sys
from pathlib import Path

# In third_party/ with its generated modules: protoc names the module after the .proto's path
# (service.oip_grpc.third_party.grpc_predict_v2_pb2), so the two must stand in one folder.
PROTO = Path(__file__).resolve().with_name("third_party") / "grpc_predict_v2.proto"
REPO_ROOT = Path(__file__).resolve().parents[2]
GENCODE_TOOLS_VERSION = "1.75.1"
GENCODE_PROTOBUF_VERSION = (6, 31, 1)
DEFAULT_POOL = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
POOL_NOTE = (
    "# hydra-serve: a private pool, so this module can share a process with tritonclient.grpc\n"
    "# (same message names, another file); see service/oip_grpc/generate.py.\n"
    "_POOL = _descriptor_pool.DescriptorPool()\n"
)


def private_pool(source: str) -> str:
    """protoc's module text with its descriptor registered in a private pool."""
    if source.count(DEFAULT_POOL) != 1:
        raise SystemExit("unexpected protoc output: no single default-pool registration to replace")
    return source.replace(DEFAULT_POOL, POOL_NOTE + "DESCRIPTOR = _POOL.AddSerializedFile(")


def main() -> None:
    from grpc_tools import protoc  # only developers regenerating need grpcio-tools

    relative = PROTO.relative_to(REPO_ROOT)
    code = protoc.main(
        ["protoc", f"-I{REPO_ROOT}", f"--python_out={REPO_ROOT}", f"--pyi_out={REPO_ROOT}", str(relative)]
    )
    if code != 0:
        raise SystemExit(f"protoc failed with status {code}")
    module = PROTO.with_name("grpc_predict_v2_pb2.py")
    module.write_text(private_pool(module.read_text()))
    print(f"wrote {module.relative_to(REPO_ROOT)} and its .pyi", file=sys.stderr)


if __name__ == "__main__":
    main()
