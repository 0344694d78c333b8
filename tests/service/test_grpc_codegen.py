"""The checked-in protobuf module: it describes exactly service/oip_grpc/third_party/grpc_predict_v2.proto,
it is wire-compatible with Triton's grpc_service.proto (what stock tritonclient.grpc speaks), its
gencode version is the one service/oip_grpc/generate.py names, and it lives in a private pool."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor
from tritonclient.grpc import service_pb2 as triton_pb

from service.oip_grpc import generate
from service.oip_grpc.third_party import grpc_predict_v2_pb2 as pb

RPCS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]


def _without_json_names(message: descriptor_pb2.DescriptorProto) -> None:
    for field in message.field:
        field.ClearField("json_name")  # protoc adds them to descriptor sets, not to gencode
    for nested in message.nested_type:
        _without_json_names(nested)


def test_checked_in_module_describes_the_proto_file(tmp_path: Path) -> None:
    protoc = pytest.importorskip("grpc_tools.protoc")  # dev dependency: grpcio-tools
    out = tmp_path / "set.pb"
    relative = generate.PROTO.relative_to(generate.REPO_ROOT)
    assert (
        protoc.main(["protoc", f"-I{generate.REPO_ROOT}", f"--descriptor_set_out={out}", str(relative)]) == 0
    )
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    for message in compiled.message_type:
        _without_json_names(message)
    embedded = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert compiled == embedded, "regenerate: python -m service.oip_grpc.generate (see its docstring)"


def test_gencode_version_and_private_pool() -> None:
    source = generate.PROTO.with_name("grpc_predict_v2_pb2.py").read_text()
    assert f"Protobuf Python Version: {'.'.join(map(str, generate.GENCODE_PROTOBUF_VERSION))}" in source
    assert generate.DEFAULT_POOL not in source and "_POOL = _descriptor_pool.DescriptorPool()" in source
    # the same full names as Triton's, in another pool: both modules load in one process (this one)
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == triton_pb.ModelInferRequest.DESCRIPTOR.full_name
    assert pb.DESCRIPTOR.pool is not triton_pb.DESCRIPTOR.pool
    minimum = re.search(r'"protobuf>=([\d.]+)"', (generate.REPO_ROOT / "pyproject.toml").read_text())
    assert minimum is not None
    assert tuple(int(x) for x in minimum.group(1).split(".")) == generate.GENCODE_PROTOBUF_VERSION


def _fields(message: Descriptor, seen: set[str]) -> list[tuple[str, str, int, int, bool, str]]:
    """(message, field, number, type, repeated, nested type) for `message` and what it contains."""
    if message.full_name in seen:
        return []
    seen.add(message.full_name)
    rows = []
    for field in message.fields:
        nested = field.message_type.full_name if field.message_type else ""
        rows.append((message.full_name, field.name, field.number, field.type, field.is_repeated, nested))
        if field.message_type:
            rows += _fields(field.message_type, seen)
    return rows


@pytest.mark.parametrize("rpc", RPCS)
def test_six_rpcs_are_wire_compatible_with_triton(rpc: str) -> None:
    ours = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[rpc]
    theirs = triton_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name[rpc]
    assert ours.full_name == theirs.full_name  # the path clients call
    for mine, triton in ((ours.input_type, theirs.input_type), (ours.output_type, theirs.output_type)):
        ours_fields = _fields(mine, set())
        triton_fields = {row[:2]: row for row in _fields(triton, set())}
        for row in ours_fields:
            if row[:2] == ("inference.ModelMetadataResponse", "properties"):
                assert row[2] not in {f.number for f in triton.fields}  # unknown to Triton: ignored
                continue
            if row[0] == "inference.ModelMetadataResponse.PropertiesEntry":
                continue
            assert triton_fields.get(row[:2]) == row, row
