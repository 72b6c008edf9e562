"""The wire contract: committed stubs are what protos/generate.py makes now, and the .proto is documented."""

from __future__ import annotations

import re

import pytest

from protos.generate import OUTPUTS, PROTO_DIR, PROTO_FILES


def test_committed_stubs_equal_freshly_generated(tmp_path):
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a test dependency) generates the stubs")
    from protos.generate import generate

    for fresh in generate(tmp_path):
        committed = PROTO_DIR / fresh.name
        assert committed.is_file(), f"{committed} is missing: run `python protos/generate.py`"
        assert fresh.read_bytes() == committed.read_bytes(), f"{fresh.name} is stale: run `python protos/generate.py`"
    assert sorted(p.name for p in tmp_path.joinpath("protos").iterdir()) == sorted(OUTPUTS)


def test_grpc_module_imports_the_messages_as_a_package_module():
    from protos import judgeserve_pb2, judgeserve_pb2_grpc

    assert "from protos import judgeserve_pb2" in (PROTO_DIR / "judgeserve_pb2_grpc.py").read_text()
    assert judgeserve_pb2.DESCRIPTOR.package == "judgeserve.v1"
    assert hasattr(judgeserve_pb2_grpc, "JudgeserveStub")


def test_every_rpc_field_and_enum_value_has_a_comment():
    """route_guide style: a comment on every rpc, field and enum value (on its line or the line above)."""
    for name in PROTO_FILES:
        lines = (PROTO_DIR / name).read_text().splitlines()
        for i, line in enumerate(lines):
            code = line.split("//")[0].strip()
            if code.startswith("rpc ") or re.search(r"=\s*\d+\s*;$", code):
                documented = "//" in line or lines[i - 1].strip().startswith("//")
                assert documented, f"{name}:{i + 1}: no comment for `{code}`"
